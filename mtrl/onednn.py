"""Float32 CPU matrix products through oneDNN, for the linear layers and the Gramians.

Why: on CPUs where Intel MKL does not use its AVX-512 kernels (AMD EPYC here), torch's
float32 ``addmm`` / ``mm`` run MKL's AVX2 code at ~100 GFLOP/s on one core, while oneDNN
(bundled with every x86 torch build) runs the same products at ~230 GFLOP/s. Dense
layers are ~87 % of a SAC update on the CPU, so this is the largest single speed-up there
(measured with ``scripts/bench_update.py`` and ``scripts/bench_balancers.py``; figures in
the README). On Intel CPUs both libraries use AVX-512 and the difference is small.

What is here:

* :func:`linear` — ``F.linear`` semantics (``x @ wᵀ + b``), as an ``autograd.Function``
  whose forward, input gradient and weight gradient are oneDNN products. It supports
  ordinary autograd and ``torch.func`` (``vmap``, ``grad``, ``functional_call``):
  under ``vmap`` over task blocks with shared weights, the blocks are folded into the
  rows of one product, and per-block weight gradients (what :mod:`mtrl.grad` needs) are
  one product per block. Anything that is not float32 on the CPU (float64 in the exact
  tests, CUDA tensors, bfloat16) goes to ``F.linear`` unchanged.
* :class:`Linear` — ``nn.Linear`` using :func:`linear` (same parameters and state dict).
* :func:`mm_nt` — ``a @ bᵀ`` for 2-D float32 CPU tensors (the Gramians).

Numbers: oneDNN sums in a different order than MKL, so float32 results differ from
``F.linear`` by float32 rounding (relative ~1e-6), not more. Double backward through
:func:`linear`'s oneDNN path is not supported (SAC never needs it); it raises.

Set ``MTRL_ONEDNN=0`` in the environment to use plain torch products everywhere.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MIN_OUT_FEATURES", "Linear", "enabled", "linear", "mm_nt", "set_enabled"]


def _find_op():
    """oneDNN's dense linear op, if this torch build has it and it computes ``x wᵀ + b``.

    ``torch.ops.mkldnn._linear_pointwise`` is torch's own (inductor's) entry to oneDNN, not
    a documented API, so it is checked on a tiny product before use; any failure or
    mismatch leaves torch's products in place.
    """
    if os.environ.get("MTRL_ONEDNN", "1").strip().lower() in {"0", "false", "no", "off"}:
        return None
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


#: Per-block weight gradients (under ``vmap``) are one oneDNN product per block from this
#: many rows per block on, one ``bmm`` below (short products are inefficient in oneDNN,
#: and the per-block results must be copied into one tensor).
_MIN_ROWS_PER_BLOCK = 64


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


def _plain_mm_nt(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    """``a @ bᵀ (+ bias)`` with oneDNN; ``a`` (N, k), ``b`` (M, k), plain tensors."""
    return _OP(a, b, bias, "none", [], "")


def mm_nt(a: Tensor, b: Tensor) -> Tensor:
    """``a @ bᵀ`` for 2-D tensors: oneDNN for float32 CPU tensors, torch otherwise."""
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"mm_nt takes 2-D tensors, got {tuple(a.shape)} and {tuple(b.shape)}")
    if _fits(a, b):
        return _plain_mm_nt(a, b)
    return a @ b.T


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weightᵀ + bias`` like ``F.linear``; oneDNN for float32 CPU tensors."""
    if weight.ndim == 2 and weight.shape[0] >= MIN_OUT_FEATURES and _fits(x, weight, bias):
        return _Linear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` whose products go through :func:`linear` (oneDNN on the CPU)."""

    def forward(self, x: Tensor) -> Tensor:
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
        x = x.movedim(x_dim, 0) if x_dim is not None else x.expand(n, *x.shape)
        weight = weight.movedim(w_dim, 0) if w_dim is not None else weight.expand(n, *weight.shape)
        y = torch.matmul(x.reshape(n, -1, x.shape[-1]), weight.transpose(-1, -2))
        y = y.reshape(*x.shape[:-1], weight.shape[-2])
        if bias is not None:
            bias = bias.movedim(b_dim, 0) if b_dim is not None else bias.expand(n, *bias.shape)
            y = y + bias.reshape(n, *([1] * (y.ndim - 2)), bias.shape[-1])
        return y, 0


class _WeightGrad(torch.autograd.Function):
    """``gradᵀ x`` over all leading dims: the weight gradient of a linear layer."""

    @staticmethod
    def forward(grad: Tensor, x: Tensor) -> Tensor:
        g = grad.reshape(-1, grad.shape[-1])
        rows = x.reshape(-1, x.shape[-1])
        return _plain_mm_nt(g.T, rows.T)

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
        grad = grad.movedim(g_dim, 0) if g_dim is not None else grad.expand(n, *grad.shape)
        x = x.movedim(x_dim, 0) if x_dim is not None else x.expand(n, *x.shape)
        # one product per vmapped block (per-task weight gradients), into one output
        g = grad.reshape(n, -1, grad.shape[-1])
        rows = x.reshape(n, -1, x.shape[-1])
        if g.shape[1] < _MIN_ROWS_PER_BLOCK:
            return torch.bmm(g.transpose(1, 2), rows), 0
        out = g.new_empty(n, g.shape[-1], rows.shape[-1])
        for i in range(n):
            out[i] = _plain_mm_nt(g[i].T, rows[i].T)
        return out, 0
