"""Float32 CPU matrix products through oneDNN, for the linear layers and the Gramians.

Why: on CPUs where Intel MKL does not use its AVX-512 kernels (AMD EPYC here), torch's
float32 ``addmm`` / ``mm`` ran at ~100 GFLOP/s on one core here (a 2048² product), while
oneDNN (part of torch's official CPU builds) runs the same products at ~230 GFLOP/s.
Dense layers are ~87 % of a SAC update on the CPU, so this is the largest single
speed-up there (measured with ``scripts/bench_update.py`` and
``scripts/bench_balancers.py``; figures in the README). On Intel CPUs, where MKL uses
AVX-512 itself, the gain is probably smaller (not measured).

What is here:

* :func:`linear` — ``F.linear`` semantics (``x @ wᵀ + b``), as an ``autograd.Function``
  whose forward, input gradient and weight gradient are oneDNN products. It supports
  ordinary autograd and ``torch.func`` (``vmap``, ``grad``, ``functional_call``):
  under ``vmap`` over task blocks with shared weights, the blocks are folded into the
  rows of one product, and per-block weight gradients (what :mod:`mtrl.grad` needs) are
  one product per block. Anything that is not float32 on the CPU (float64 in the exact
  tests, CUDA tensors, bfloat16) goes to ``F.linear`` unchanged.
* :class:`Linear` — ``nn.Linear`` using :func:`linear` (same parameters and state dict).
* :class:`MLP` — ``Linear``/``ReLU`` stacks (mtrl's actor and critic networks) as ONE
  function forward and one backward: ``autograd.Function`` calls under ``torch.func``
  carry ~0.3-0.5 ms of bookkeeping each, three per layer otherwise (forward, input
  gradient, weight gradient). Measured on the K = 10 SAC update: balanced methods went
  from 1.34-1.38× to 1.20-1.23× the ``mean`` update.
* :func:`mm_nt` — ``a @ bᵀ`` for 2-D float32 CPU tensors; :func:`gram` — ``a @ aᵀ``
  using its symmetry (the Gramians).
* :func:`block_gradients` — per-task (per-block) parameter gradients of ``MLP`` /
  ``Linear`` layers from one ORDINARY backward pass, without ``torch.func``: what
  :func:`mtrl.grad.balanced_backward_terms` (and so the SAC agent) uses on the CPU.
  Measured: 4-5 ms less per SAC loss than the ``vmap`` path, e.g. the K = 10 balanced
  SAC update 110 → 96 ms.

Per-task weight gradients (``vmap`` over task blocks, or ``block_gradients``) are one
oneDNN product per block, copied into one ``(K, out, in)`` tensor (oneDNN cannot write
into a slice); blocks under 16 rows and layers with under 128 inputs or outputs take one
batched MKL ``bmm`` instead. With only 25 rows per block at K = 50 these products are far
from peak speed, and the K × K Gramian of the per-task gradients (see :func:`gram`) costs
most of a plain backward there: together that keeps the K = 50 balanced update at ~1.8×
the ``mean`` update with oneDNN (~1.5× with torch's products, whose ``mean`` update is
itself ~1.8× slower).

Numbers: oneDNN sums in a different order than MKL, so float32 results differ from
``F.linear`` by float32 rounding (relative ~1e-6), not more. Double backward through
the oneDNN path is not supported (SAC never needs it); it raises.

Set ``MTRL_ONEDNN=0`` in the environment to use plain torch products everywhere.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # torch's registries of global module hooks (private; they exist since torch 1.x)
    from torch.nn.modules.module import (
        _global_backward_hooks,
        _global_backward_pre_hooks,
        _global_forward_hooks,
        _global_forward_pre_hooks,
    )
except ImportError:  # pragma: no cover - then only the layers' own hooks are checked
    _global_forward_hooks, _global_forward_pre_hooks = {}, {}
    _global_backward_hooks, _global_backward_pre_hooks = {}, {}

__all__ = [
    "MIN_OUT_FEATURES",
    "MLP",
    "Linear",
    "block_gradients",
    "enabled",
    "gram",
    "linear",
    "mm_nt",
    "set_enabled",
]


def _find_op():
    """oneDNN's dense linear op, if this torch build has it and it computes ``x wᵀ + b``.

    ``torch.ops.mkldnn._linear_pointwise`` is torch's own (inductor's) entry to oneDNN, not
    a documented API, so it is checked on a tiny product before use; any failure or
    mismatch leaves torch's products in place.
    """
    setting = os.environ.get("MTRL_ONEDNN", "1").strip().lower()
    if setting in {"0", "false", "no", "off"}:
        return None
    if setting not in {"1", "true", "yes", "on", ""}:
        warnings.warn(
            f"MTRL_ONEDNN={os.environ['MTRL_ONEDNN']!r} is not understood; oneDNN stays on "
            "(MTRL_ONEDNN=0 turns it off)", stacklevel=2,
        )
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        op = torch.ops.mkldnn._linear_pointwise
        x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
        w = torch.arange(12, dtype=torch.float32).reshape(4, 3) - 5.0
        b = torch.arange(4, dtype=torch.float32)
        ok = torch.equal(op(x, w, b, "none", [], ""), F.linear(x, w, b)) and torch.equal(
            op(x.T, x.T, None, "none", [], ""), x.T @ x
        )
    except Exception:  # noqa: BLE001 - any failure means "do not use it"
        return None
    return op if ok else None


_AVAILABLE = _find_op()
_OP = _AVAILABLE

#: Layers with fewer output features than this use ``F.linear``: their products are
#: small, and the ``autograd.Function`` bookkeeping under ``torch.func`` (~0.3-0.5 ms
#: per call and level) costs more than oneDNN saves (SAC's Q and policy output layers:
#: 1 and 2·|A| outputs). Measured: routing the input layers (49-93 → 400) to torch too
#: made the K = 10 update slower (mean 88 → 98 ms, cagrad 119 → 126 ms).
MIN_OUT_FEATURES = 16


#: Per-block weight gradients (``vmap`` and :func:`block_gradients`) are one oneDNN product
#: per block when the blocks have at least ``_MIN_ROWS_PER_BLOCK`` rows and the layer at
#: least ``_MIN_FEATURES_PER_BLOCK`` inputs and outputs; otherwise one ``bmm`` for all
#: blocks. Measured (one thread, ms for all blocks of one layer, per-block products incl.
#: the copy into one tensor vs ``bmm``): 400 → 400 at K = 50 with 25 rows 4.2 vs 5.4 (the
#: CAGrad update 190 → 169 ms), at K = 10 with 128 rows 2.1 vs 3.7; but 400 → 1 at K = 50
#: 0.83 vs 0.03 and 93 → 400 1.69 vs 1.15, where the ~17 µs per product dominates.
_MIN_ROWS_PER_BLOCK = 16
_MIN_FEATURES_PER_BLOCK = 128


def enabled() -> bool:
    """Whether float32 CPU products go through oneDNN in this process."""
    return _OP is not None


def set_enabled(on: bool) -> bool:
    """Turn the oneDNN products on or off for this process (e.g. to compare both in one
    benchmark run); returns whether they are on now (False where oneDNN is missing or
    ``MTRL_ONEDNN=0`` was set at import)."""
    global _OP
    _OP = _AVAILABLE if on else None
    return enabled()


def _fits(*tensors: Tensor | None) -> bool:
    return _OP is not None and all(
        t is None or (t.dtype == torch.float32 and t.device.type == "cpu") for t in tensors
    )


def _dense(t: Tensor) -> Tensor:
    """``t`` if it or its transpose is contiguous, else a contiguous copy: oneDNN takes
    row- or column-major operands as they are, but other strides (a column slice, say)
    send it down a path measured ~1000× slower than the copy."""
    if t.is_contiguous() or t.T.is_contiguous():
        return t
    return t.contiguous()


def _plain_mm_nt(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    """``a @ bᵀ (+ bias)`` with oneDNN; ``a`` (N, k), ``b`` (M, k), plain tensors.

    Empty operands (a zero-size dimension, e.g. a weight gradient over 0 rows) go to
    torch: oneDNN cannot create the primitive for them."""
    if a.numel() == 0 or b.numel() == 0 or _OP is None:  # (None: turned off since forward)
        out = a @ b.T
        return out if bias is None else out + bias
    if bias is not None and not bias.is_contiguous():  # oneDNN reads it as contiguous
        bias = bias.contiguous()
    return _OP(_dense(a), _dense(b), bias, "none", [], "")


def _tracked(*tensors: Tensor) -> bool:
    """Whether autograd would record a product of ``tensors``: the oneDNN op has no
    autograd formula (its output would claim a gradient that never reaches them)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def mm_nt(a: Tensor, b: Tensor) -> Tensor:
    """``a @ bᵀ`` for 2-D tensors: oneDNN for float32 CPU tensors, torch otherwise (and
    where autograd records the product)."""
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"mm_nt takes 2-D tensors, got {tuple(a.shape)} and {tuple(b.shape)}")
    if _fits(a, b) and not _tracked(a, b):
        return _plain_mm_nt(a, b)
    return a @ b.T


#: :func:`gram` forms ``a aᵀ`` of more than this many rows in lower-triangle panels of
#: this many columns when ``a`` has at least :data:`GRAM_PANEL_MIN_COLS` columns.
GRAM_PANEL = 16
GRAM_PANEL_MIN_COLS = 1 << 14


def gram(a: Tensor) -> Tensor:
    """``a @ aᵀ`` for a 2-D tensor (oneDNN for float32 CPU tensors, torch otherwise and
    where autograd records the product).

    A product of a (K, d) matrix with itself does K² d multiply-adds where K (K+1) d / 2
    suffice. For K > :data:`GRAM_PANEL` and long rows the lower triangle is formed in
    column panels, ``a[i:] @ a[i:i+16]ᵀ``, and mirrored: ~K (K+16) d / 2 multiply-adds,
    in products that oneDNN runs about as fast as one K-row product. Measured, one thread,
    AMD EPYC: K = 50, d = 160,000: 5.6 → 3.9 ms (two threads: 2.8 → 2.25 ms);
    d = 37,200: 1.17 → 0.79 ms; K = 100, d = 160,000: 18.1 → 12.8 ms. Short rows (under
    :data:`GRAM_PANEL_MIN_COLS` columns) lose more to the extra calls than they gain
    (K = 50, d = 4,096: 0.10 vs 0.12 ms) and take one product. Each entry is still one
    float32 product over all d columns, as accurate as in one product of the whole matrix
    (tested).
    """
    if (a.ndim != 2 or not _fits(a) or _tracked(a) or a.shape[0] <= GRAM_PANEL
            or a.shape[1] < GRAM_PANEL_MIN_COLS):
        return mm_nt(a, a)  # (mm_nt also says what is wrong with a tensor that is not 2-D)
    k = a.shape[0]
    a = a.contiguous()  # row slices of it are then dense operands
    out = a.new_empty(k, k)
    for i in range(0, k, GRAM_PANEL):
        out[i:, i : i + GRAM_PANEL] = _plain_mm_nt(a[i:], a[i : i + GRAM_PANEL])
    return out.tril() + out.tril(-1).T


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weightᵀ + bias`` like ``F.linear``; oneDNN for float32 CPU tensors."""
    if weight.ndim == 2 and weight.shape[0] >= MIN_OUT_FEATURES and _fits(x, weight, bias):
        return _Linear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` whose products go through :func:`linear` (oneDNN on the CPU)."""

    def forward(self, x: Tensor) -> Tensor:
        params = (self.weight, self.bias)
        if self.bias is not None and _fits(x, *params) and _takes_blocks(x, params):
            return _block_mlp(x, params)
        return linear(x, self.weight, self.bias)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        return _plain_mm_nt(rows, weight, bias).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _Linear.apply(grad, weight.T, None)  # oneDNN takes the strides as they are
        if ctx.needs_input_grad[1]:
            gw = _WeightGrad.apply(grad, x)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.reshape(-1, grad.shape[-1]).sum(0)
        return gx, gw, gb

    @staticmethod
    def vmap(info, in_dims, x, weight, bias):
        x_dim, w_dim, b_dim = in_dims
        if w_dim is None and b_dim is None:
            # shared weights: fold the vmapped dim into the rows of one product
            if x_dim is None:
                return _Linear.apply(x, weight, bias), None
            return _Linear.apply(x.movedim(x_dim, 0), weight, bias), 0
        # per-sample weights (rare): batched torch products
        n = info.batch_size
        x, weight = _to_front(x, x_dim, n), _to_front(weight, w_dim, n)
        y = torch.matmul(x.reshape(n, -1, x.shape[-1]), weight.transpose(-1, -2))
        y = y.reshape(*x.shape[:-1], weight.shape[-2])
        if bias is not None:
            bias = _to_front(bias, b_dim, n)
            y = y + bias.reshape(n, *([1] * (y.ndim - 2)), bias.shape[-1])
        return y, 0


class _WeightGrad(torch.autograd.Function):
    """``gradᵀ x`` over all leading dims: the weight gradient of a linear layer."""

    @staticmethod
    def forward(grad: Tensor, x: Tensor) -> Tensor:
        return _plain_mm_nt(_flat(grad).T, _flat(x).T)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError(
            "double backward through mtrl.onednn.linear is not supported; "
            "set MTRL_ONEDNN=0 to use torch's own linear layers"
        )

    @staticmethod
    def vmap(info, in_dims, grad, x):
        g_dim, x_dim = in_dims
        n = info.batch_size
        grad, x = _to_front(grad, g_dim, n), _to_front(x, x_dim, n)
        # the per-task weight gradients: one per vmapped block
        g = grad.reshape(n, -1, grad.shape[-1])
        return _per_block_weight_grad(g, x.reshape(n, -1, x.shape[-1])), 0


# ------------------------------------------------------------------------ fused MLPs
_LINEAR_FORWARDS = (nn.Linear.forward, Linear.forward)


class MLP(nn.Sequential):
    """``Linear, ReLU, Linear, ReLU, ..., Linear`` (ReLU between layers, none after the
    last), an ``nn.Sequential`` with the usual parameter names.

    When every layer takes oneDNN (float32 on the CPU, all layers with a bias), the
    whole stack runs as ONE ``autograd.Function`` forward and one backward, instead of
    three Function calls per layer (forward, input gradient, weight gradient): under
    ``torch.func`` each call carries ~0.3-0.5 ms of bookkeeping, which at K = 10 was a
    third of the per-task gradient cost. Any other input (float64, CUDA, a module that
    is not this exact pattern, e.g. after ``append``, or one whose layers have hooks)
    runs layer by layer.
    """

    def _fusable(self) -> bool:
        """Whether the stack is (still) exactly ``Linear (ReLU Linear)*`` with biases and
        no hooks that the fused path would skip. Checked on every call (a few µs): an
        ``nn.Sequential`` can be edited after construction (``append``, ``m[i] = ...``);
        forward and backward hooks on the layers or global ones (``weight_norm``'s
        pre-hook among them) must run; a subclass of ``nn.Linear`` / ``nn.ReLU`` with
        its own ``forward`` computes something else. Such stacks go layer by layer."""
        mods = list(self)
        return (
            len(mods) % 2 == 1
            and all(type(m).forward in _LINEAR_FORWARDS and m.bias is not None
                    for m in mods[0::2])
            and all(type(m).forward is nn.ReLU.forward for m in mods[1::2])
            and not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                        or m._backward_pre_hooks for m in mods)
            and not (_global_forward_hooks or _global_forward_pre_hooks
                     or _global_backward_hooks or _global_backward_pre_hooks)
        )

    def forward(self, x: Tensor) -> Tensor:
        if not self._fusable():
            return super().forward(x)
        params = [t for lin in list(self)[0::2] for t in (lin.weight, lin.bias)]
        if not _fits(x, *params):
            return super().forward(x)
        if _takes_blocks(x, params):
            return _block_mlp(x, params)
        return _MLP.apply(x, *params)[0]


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _mlp_forward(h: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """``Linear (ReLU Linear)*`` on rows ``h``; returns the output and the ReLU outputs."""
    hidden = []
    n_layers = len(params) // 2
    for layer in range(n_layers):
        h = _plain_mm_nt(h, params[2 * layer], params[2 * layer + 1])
        if layer < n_layers - 1:
            h = torch.relu_(h)
            hidden.append(h)
    return h, hidden


def _unflat(t: Tensor, like: Tensor) -> Tensor:
    return t.reshape(*like.shape[:-1], t.shape[-1])


def _mlp_grads(
    g: Tensor, inputs: list[Tensor], weights: list[Tensor], blocks: int | None,
    need: tuple[bool, ...],
) -> list[Tensor | None]:
    """Backward through ``Linear (ReLU Linear)*`` on row-flattened tensors.

    ``inputs[l]`` is layer ``l``'s input (``x``, then the ReLU outputs), ``g`` the gradient
    of the last layer's output, ``need = (x, layer 0, layer 1, ...)`` which gradients to
    compute. With ``blocks`` the rows are ``blocks`` equal task blocks and the parameter
    gradients are per block. Returns ``[gx, gW_0, gb_0, gW_1, ...]``, None where not
    needed.
    """
    out: list[Tensor | None] = []
    lowest = 0 if need[0] else next((i for i, n in enumerate(need[1:]) if n), len(weights))
    for layer in range(len(weights) - 1, -1, -1):
        inp = inputs[layer]
        if not need[1 + layer]:
            out[:0] = [None, None]
        elif blocks is None:
            out[:0] = [_plain_mm_nt(g.T, inp.T), g.sum(0)]
        else:
            gb = g.reshape(blocks, -1, g.shape[-1])
            rows = inp.reshape(blocks, -1, inp.shape[-1])
            out[:0] = [_per_block_weight_grad(gb, rows), gb.sum(1)]
        if layer == lowest and not need[0]:
            return [None, *([None, None] * layer), *out]
        g = _plain_mm_nt(g, weights[layer].T)
        if layer > 0:
            # ReLU (its output is this layer's input): one fused pass instead of
            # compare + convert + multiply
            g = torch.ops.aten.threshold_backward(g, inp, 0)
    return [g, *out]


def _per_block_weight_grad(g: Tensor, rows: Tensor) -> Tensor:
    """``g[i]ᵀ rows[i]`` for each block ``i``: ``(B, n, out), (B, n, in) -> (B, out, in)``."""
    if (
        g.shape[1] < _MIN_ROWS_PER_BLOCK
        or min(g.shape[-1], rows.shape[-1]) < _MIN_FEATURES_PER_BLOCK
    ):
        return torch.bmm(g.transpose(1, 2), rows)
    out = g.new_empty(g.shape[0], g.shape[-1], rows.shape[-1])
    for i in range(g.shape[0]):
        out[i] = _plain_mm_nt(g[i].T, rows[i].T)
    return out


def _to_front(t: Tensor, dim: int | None, n: int) -> Tensor:
    return t.movedim(dim, 0) if dim is not None else t.expand(n, *t.shape)


class _MLP(torch.autograd.Function):
    """Outputs: the last layer's output, then every hidden ReLU output (saved for the
    backward pass, not differentiable)."""

    @staticmethod
    def forward(x: Tensor, *params: Tensor):
        h, hidden = _mlp_forward(_flat(x), params)
        return tuple(_unflat(t, x) for t in (h, *hidden))

    @staticmethod
    def setup_context(ctx, inputs, outputs) -> None:
        x, *params = inputs
        ctx.mark_non_differentiable(*outputs[1:])
        # the hidden outputs get no gradient: do not fill (N, width) zeros for them
        ctx.set_materialize_grads(False)
        ctx.n_hidden = len(outputs) - 1
        ctx.save_for_backward(x, *outputs[1:], *params[0::2])

    @staticmethod
    def backward(ctx, grad_y: Tensor | None, *_unused):
        if grad_y is None:  # the output was not used in the loss
            return (None,) * len(ctx.needs_input_grad)
        x, *rest = ctx.saved_tensors
        hidden, weights = rest[: ctx.n_hidden], rest[ctx.n_hidden :]
        nig = ctx.needs_input_grad
        need = (nig[0], *(nig[1 + 2 * i] or nig[2 + 2 * i] for i in range(len(weights))))
        grads = _MLPGrad.apply(need, grad_y, x, *hidden, *weights)
        return tuple(g if n else None for g, n in zip(grads, nig, strict=True))

    @staticmethod
    def vmap(info, in_dims, x, *params):
        x_dim, p_dims = in_dims[0], in_dims[1:]
        n_out = len(params) // 2  # the output and n_out - 1 hidden activations
        if all(d is None for d in p_dims):  # shared weights: fold the blocks into rows
            if x_dim is None:
                return _MLP.apply(x, *params), (None,) * n_out
            return _MLP.apply(x.movedim(x_dim, 0), *params), (0,) * n_out
        # per-sample weights (rare): batched torch products
        b = info.batch_size
        xb = _to_front(x, x_dim, b)
        h = xb.reshape(b, -1, xb.shape[-1])
        hidden = []
        for layer in range(n_out):
            w = _to_front(params[2 * layer], p_dims[2 * layer], b)
            bias = _to_front(params[2 * layer + 1], p_dims[2 * layer + 1], b)
            h = torch.baddbmm(bias.unsqueeze(1), h, w.transpose(1, 2))
            if layer < n_out - 1:
                h = torch.relu(h)
                hidden.append(h)
        outs = tuple(t.reshape(*xb.shape[:-1], t.shape[-1]) for t in (h, *hidden))
        return outs, (0,) * len(outs)


class _MLPGrad(torch.autograd.Function):
    """Gradients of an :class:`MLP` stack: ``(need, grad_y, x, *hidden, *weights) ->
    (gx, gW_0, gb_0, gW_1, gb_1, ...)``; entries not in ``need`` are zero placeholders."""

    @staticmethod
    def forward(need: tuple[bool, ...], grad_y: Tensor, x: Tensor, *rest: Tensor):
        n_hidden = (len(rest) - 1) // 2
        hidden, weights = rest[:n_hidden], rest[n_hidden:]
        inputs = [_flat(x), *(_flat(h) for h in hidden)]
        grads = _mlp_grads(_flat(grad_y), inputs, list(weights), None, need)
        if grads[0] is not None:
            grads[0] = _unflat(grads[0], x)
        return tuple(grad_y.new_zeros(()) if t is None else t for t in grads)

    @staticmethod
    def setup_context(ctx, inputs, outputs) -> None:
        pass

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            "double backward through mtrl.onednn.MLP is not supported; "
            "set MTRL_ONEDNN=0 to use torch's own linear layers"
        )

    @staticmethod
    def vmap(info, in_dims, need, grad_y, x, *rest):
        b = info.batch_size
        n_hidden = (len(rest) - 1) // 2
        hidden, weights = list(rest[:n_hidden]), list(rest[n_hidden:])
        h_dims, w_dims = in_dims[3 : 3 + n_hidden], in_dims[3 + n_hidden :]
        g = _to_front(grad_y, in_dims[1], b)
        x = _to_front(x, in_dims[2], b)
        hidden = [_to_front(h, d, b) for h, d in zip(hidden, h_dims, strict=True)]
        if all(d is None for d in w_dims):  # shared weights: per-block parameter grads
            inputs = [_flat(x), *(_flat(h) for h in hidden)]
            grads = _mlp_grads(_flat(g), inputs, weights, b, need)
            if grads[0] is not None:
                grads[0] = _unflat(grads[0], x)
        else:  # per-sample weights: batched torch products
            grads = _batched_mlp_grads(g, x, hidden, weights, w_dims, b)
        out = tuple(g.new_zeros(b) if t is None else t for t in grads)
        return out, (0,) * len(out)


def _batched_mlp_grads(g, x, hidden, weights, w_dims, b) -> list[Tensor]:
    ws = [_to_front(w, d, b) for w, d in zip(weights, w_dims, strict=True)]
    gr = g.reshape(b, -1, g.shape[-1])
    inputs = [t.reshape(b, -1, t.shape[-1]) for t in (x, *hidden)]
    out: list[Tensor] = []
    for layer in range(len(ws) - 1, -1, -1):
        inp = inputs[layer]
        out[:0] = [torch.bmm(gr.transpose(1, 2), inp), gr.sum(1)]
        gr = torch.bmm(gr, ws[layer])
        if layer > 0:
            gr = torch.ops.aten.threshold_backward(gr, inp, 0)
    return [gr.reshape(x.shape), *out]


# ----------------------------------------------------------------- block gradients
class _BlockMode(threading.local):
    """Per-thread state of :func:`block_gradients` (``blocks is None``: off)."""

    blocks: int | None = None
    rows: int = 0
    probes: list[tuple[Tensor, Tensor]]

    def __init__(self) -> None:
        self.probes = []


_BLOCK_MODE = _BlockMode()


@contextlib.contextmanager
def block_gradients(blocks: int, rows: int) -> Iterator[list[tuple[Tensor, Tensor]]]:
    """Per-block parameter gradients from ONE ordinary backward pass, without ``torch.func``.

    Inside the ``with`` block, each :class:`MLP` and :class:`Linear` that runs on oneDNN,
    has a parameter that requires grad and gets a 2-D input of exactly ``rows`` rows
    treats those rows as ``blocks`` equal, consecutive blocks (block ``k`` = rows
    ``[k rows/blocks, (k+1) rows/blocks)``). For each such parameter ``p`` it appends
    ``(p, probe)`` to the yielded list, where ``probe`` is a ``(blocks, *p.shape)``
    tensor in the graph (its values are never read). After a backward of
    ``Σ_k loss_k``, where ``loss_k`` depends on block ``k``'s rows only, the gradient
    with respect to ``probe`` is the stack of the per-block gradients ``∂loss_k/∂p``
    (``torch.autograd.grad(..., probes)``); ``p`` itself gets no gradient through these
    layers. Layers that do not qualify (other shapes, float64, CUDA, frozen) run as
    usual and record nothing, so a caller can tell which parameters were covered.

    This is what :func:`mtrl.grad.balanced_backward_terms` uses on the CPU: the
    ``torch.func`` path costs ~0.7 ms of Python bookkeeping per layer stack and
    transform level, 4-5 ms per SAC loss. The per-block weight gradients themselves are
    the same products as under ``vmap``. Not re-entrant; not for use inside
    ``torch.func`` transforms.
    """
    if blocks < 1 or rows < blocks or rows % blocks:
        raise ValueError(f"rows ({rows}) must be a positive multiple of blocks ({blocks})")
    if _BLOCK_MODE.blocks is not None:
        raise RuntimeError("block_gradients is already active in this thread")
    _BLOCK_MODE.blocks, _BLOCK_MODE.rows, _BLOCK_MODE.probes = blocks, rows, []
    try:
        yield _BLOCK_MODE.probes
    finally:
        _BLOCK_MODE.blocks, _BLOCK_MODE.rows, _BLOCK_MODE.probes = None, 0, []


def _takes_blocks(x: Tensor, params: Sequence[Tensor]) -> bool:
    """Whether a layer stack with these (oneDNN-ready) inputs records block gradients."""
    return (
        _BLOCK_MODE.blocks is not None
        and torch.is_grad_enabled()
        and x.ndim == 2
        and x.shape[0] == _BLOCK_MODE.rows
        and any(p.requires_grad for p in params)
    )


def _block_mlp(x: Tensor, params: Sequence[Tensor]) -> Tensor:
    blocks = _BLOCK_MODE.blocks
    probes: list[Tensor | None] = []
    for p in params:
        if p.requires_grad:
            base = torch.zeros((), dtype=p.dtype, device=p.device, requires_grad=True)
            probe = base.expand(blocks, *p.shape)
            _BLOCK_MODE.probes.append((p, probe))
            probes.append(probe)
        else:
            probes.append(None)
    return _BlockMLP.apply(x, blocks, len(params), *params, *probes)


class _BlockMLP(torch.autograd.Function):
    """``Linear (ReLU Linear)*`` whose backward returns per-block parameter gradients to
    the probes (see :func:`block_gradients`) and nothing to the parameters."""

    @staticmethod
    def forward(ctx, x: Tensor, blocks: int, n_params: int, *tensors: Tensor | None) -> Tensor:
        params, probes = tensors[:n_params], tensors[n_params:]
        out, hidden = _mlp_forward(x, params)
        ctx.save_for_backward(x, *hidden, *params[0::2])
        ctx.blocks, ctx.n_hidden = blocks, len(hidden)
        ctx.has_probe = [p is not None for p in probes]
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        x, *rest = ctx.saved_tensors
        hidden, weights = rest[: ctx.n_hidden], rest[ctx.n_hidden :]
        has = ctx.has_probe
        layers = range(len(weights))
        need = (ctx.needs_input_grad[0], *(has[2 * i] or has[2 * i + 1] for i in layers))
        grads = _mlp_grads(g, [x, *hidden], list(weights), ctx.blocks, need)
        to_probes = [gr if h else None for gr, h in zip(grads[1:], has, strict=True)]
        return (grads[0], None, None, *([None] * len(has)), *to_probes)
