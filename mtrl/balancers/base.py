"""The balancer base class: K task gradients (and losses) in, one update direction out.

A balancer is pure math. Almost every method in the literature is a *weighting*: the
direction is ``Gᵀw`` for weights ``w`` computed from the K×K Gramian ``G Gᵀ`` (and maybe
the losses). Subclasses therefore implement :meth:`Balancer.weights` on a small float64
CPU Gramian, and :meth:`Balancer.combine` does the D-sized work as two matrix products on
the gradients' own device.

Loss-only methods (``mean``, ``famo``) set ``needs_grads = False``: their weights depend on
the losses alone, so the autograd plumbing can skip the per-task Jacobian and run one
backward pass of ``(w * losses).sum()``.

Objective-sampling methods (``sdmgrad-os``) override :meth:`Balancer.select` to name the
task rows they need this step; the plumbing computes only those rows and passes them (and
the matching losses) to :meth:`Balancer.combine_rows`.

Methods that need the losses after the optimiser step (``famo``) set
``needs_losses_after_step = True`` and implement :meth:`Balancer.after_step`; the trainer
calls it for any balancer with that flag, never by name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from mtrl import onednn


class Balancer(nn.Module):
    """Base class of all balancers. Subclasses set ``name`` and implement ``weights``.

    State that must survive a checkpoint (carried weights, warm starts, logits) is kept in
    module buffers, so ``state_dict()`` / ``load_state_dict()`` save and restore it.
    """

    name: ClassVar[str] = ""
    #: False for methods whose weights depend on the losses only (no Jacobian needed).
    needs_grads: ClassVar[bool] = True
    #: True for methods that must see the losses after the optimiser step (FAMO).
    needs_losses_after_step: ClassVar[bool] = False
    #: True for methods defined on non-negative losses only (FAMO balances log-losses).
    #: Agents refuse to route a loss that can be negative (SAC's actor and temperature
    #: losses) through such a balancer, with a message, before training starts.
    needs_nonnegative_losses: ClassVar[bool] = False
    #: False for methods whose ``weights`` use only the NUMBER of losses, not their
    #: values (``mean``, and the gradient methods that solve from the Gramian alone):
    #: ``weights_for`` then passes zeros of that length instead of copying the losses to
    #: the CPU, which on an accelerator is a host sync. True by default, so a method
    #: that reads them is never handed zeros.
    reads_losses: ClassVar[bool] = True

    # Properties checked by :func:`mtrl.testing.check_balancer` (plug-ins declare theirs).
    #: Permuting the task rows (and losses) leaves the output unchanged. False for
    #: methods with random task orders or objective sampling.
    permutation_equivariant: ClassVar[bool] = True
    #: Scaling every gradient by ``s > 0`` scales the output by ``s ** scale_degree``;
    #: ``None`` if the method has no such law. May be a property (FairGrad: it depends on α).
    scale_degree: float | None = 1.0
    #: K=1, or K identical rows, return exactly that row (mean scale). False for methods
    #: whose published formula returns another positive multiple of it (CAGrad, Nash-MTL,
    #: FairGrad).
    consensus_exact: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        #: Diagnostics of the last call (float64 CPU tensors / Python values), e.g. the
        #: weights, solver iterations, residuals, or a ``fallback`` flag (a reason string;
        #: :meth:`weights_for` removes it before each solve, so ``weights`` only sets it).
        self.info: dict[str, Any] = {}
        #: dtype the current call's Gramian was formed in: the task gradients', or
        #: float64 where a float32 Gramian was redone (``None`` if unknown).
        self.grads_dtype: torch.dtype | None = None

    def gram_eps(self) -> float:
        """Relative precision of this call's Gramian entries: the machine epsilon of the
        dtype :func:`gramian_and_dtype` formed it in (the gradients' dtype, at least
        float32, or float64 after a redo; float64 when unknown)."""
        formed = torch.promote_types(self.grads_dtype or torch.float64, torch.float32)
        return float(torch.finfo(formed).eps)

    # ------------------------------------------------------------------ the math
    def weights(self, gram: Tensor | None, losses: Tensor | None) -> Tensor:
        """Return the K weights (float64, CPU) such that the direction is ``Gᵀw``.

        ``gram`` is the float64 CPU Gramian ``G Gᵀ`` (it may be ``None`` for loss-only
        methods, ``needs_grads = False``, when losses are given); ``losses`` the float64
        CPU loss vector, or ``None`` if not given.
        """
        raise NotImplementedError

    def select(self, num_tasks: int) -> Tensor | None:
        """Indices of the task rows needed this step, or ``None`` for all of them."""
        return None

    def after_step(self, losses_after: Tensor) -> None:  # noqa: B027 - optional hook
        """Hook called with the task losses re-evaluated after the optimiser step.

        ``losses_after`` is a (K,) float64 CPU tensor, like the losses ``weights`` gets.
        """

    # ------------------------------------------------------------------ entry points
    def combine(self, grads: Tensor, losses: Tensor | None = None) -> Tensor:
        """Combine task gradients ``grads`` (K, D) into one direction (D,).

        ``losses`` (K,) is used by methods that need it and ignored by the others.
        The result has the dtype and device of ``grads``.
        """
        check_inputs(grads, losses)
        idx = self.select(grads.shape[0])
        if idx is not None:
            grads = grads.index_select(0, to_device(idx, grads.device))
            if losses is not None:
                losses = losses.index_select(0, to_device(idx, losses.device))
        return self.combine_rows(grads, losses)

    def combine_rows(self, grads: Tensor, losses: Tensor | None = None) -> Tensor:
        """Combine already-selected rows (no sampling). Used by the autograd plumbing."""
        w = self.weights_for(grads, losses)
        return weighted_sum(w, grads)

    def weights_for(
        self,
        grads: Tensor | None,
        losses: Tensor | None,
        *,
        gram: Tensor | None = None,
        grads_dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Weights (float64, CPU) for the given rows: Gramian on device, solve on CPU.

        Plumbing that has already formed the rows' Gramian (e.g. :mod:`mtrl.grad`, which
        sums per-parameter Gramians instead of concatenating the rows into one matrix)
        passes it as ``gram`` (float64, CPU) with ``grads=None``, and the dtype its
        products ran in as ``grads_dtype`` (the gradients' dtype, or float64 where
        :func:`gramian_and_dtype` redid it; methods pick round-off tolerances from it).
        """
        self.info.pop("fallback", None)  # a fallback flag describes this call only
        if gram is None and self.needs_grads and grads is None:
            raise ValueError(f"balancer {self.name!r} needs the task gradients")
        if losses is None and not self.needs_grads and self.reads_losses:
            raise ValueError(
                f"{self.name or type(self).__name__} weights the task losses: call "
                "combine(grads, losses)"
            )
        # A loss-only method that never reads the values (mean) gets the Gramian when no
        # losses were given: it tells it K.
        self.grads_dtype = grads.dtype if grads is not None else grads_dtype
        if gram is None and grads is not None and (self.needs_grads or losses is None):
            gram, self.grads_dtype = gramian_and_dtype([grads])
        if losses is None:
            loss64 = None
        elif self.reads_losses:
            loss64 = losses.detach().to("cpu", torch.float64)
        else:  # only the length is used: no device-to-host copy
            loss64 = torch.zeros(losses.shape[0], dtype=torch.float64)
        # NaN/Inf task gradients or losses (the plumbing does not check them; combine does):
        # refuse before weights() runs, so no solver state (carried weights, caches,
        # counters) moves on a step that the agent's NaN guard will skip. A sampler's
        # select() has run by now in the plumbing (its generator has moved): callers that
        # skip the step restore a snapshot of the state, as MultiTaskSAC does
        for what, t in (("Gramian", gram), ("losses", loss64)):
            if t is not None and not bool(torch.isfinite(t).all()):
                raise FloatingPointError(
                    f"balancer {self.name!r} got a non-finite {what} (NaN/Inf task gradients "
                    "or losses); nothing was solved"
                )
        # copies (K×K and K numbers): a weights() that edits its inputs in place (a ridge
        # on the diagonal, losses shifted before a softmax) must not change the caller's
        # losses or the Gramian the plumbing reuses for the logged statistics
        w = self.weights(None if gram is None else gram.clone(),
                         None if loss64 is None else loss64.clone())
        rows = next(t.shape[0] for t in (gram, loss64, grads) if t is not None)
        if not isinstance(w, Tensor) or w.shape != (rows,):
            got = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
            raise ValueError(
                f"balancer {self.name!r}: weights() returned {got} for {rows} task rows; "
                f"it must return a ({rows},) tensor"
            )
        if not torch.isfinite(w).all():
            raise FloatingPointError(f"balancer {self.name!r} produced non-finite weights {w}")
        self.info["weights"] = w
        return w

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # State whose size depends on K (carried weights, logits, ...) starts as an empty
        # buffer; resize own buffers to the saved shapes so a fresh instance can load it.
        for name, buf in self._buffers.items():
            key = prefix + name
            if buf is not None and key in state_dict and state_dict[key].shape != buf.shape:
                self._buffers[name] = torch.empty(
                    state_dict[key].shape, dtype=buf.dtype, device=buf.device
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())

    def hparams(self) -> dict[str, Any]:
        """The hyper-parameters given to ``__init__`` (subclasses store them as attributes)."""
        from mtrl.balancers.registry import hparam_defaults

        return {p: getattr(self, p) for p in hparam_defaults(type(self)) if hasattr(self, p)}


def to_device(t: Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> Tensor:
    """``t.to(device, dtype)`` without stalling a CUDA stream.

    Weights, statistics and sampled task indices are made on the CPU (the K×K solves run
    there). A plain copy of a CPU tensor to CUDA is a blocking copy from pageable memory:
    the host waits until the GPU has drained its queue, once per copy (one per parameter
    when the direction is written block by block). From pinned memory the copy is
    queued (``non_blocking``) and the host goes on; the pinned block is kept until the
    copy has run. Everything else is ``t.to(device=device, dtype=dtype)``."""
    device = torch.device(device)
    if t.device.type == "cpu" and device.type == "cuda":
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)  # on the host, before the copy
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device=device, dtype=dtype)


def weights_fit(w: Tensor, dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """Whether the float64 weights ``w`` keep their values cast to ``dtype``: the largest
    is finite there and every weight down to ``eps`` times it is a normal number.

    Not so for FairGrad's weights of tiny gradients (they grow like ``|g|^(-4/3)`` at
    α = 2: ~1e40 at ``|g| ~ 1e-30``, infinite in float32) or weights of ~1e-35 (subnormal
    in float32). MPS has no float64: there the cast is the only way."""
    if dtype == torch.float64 or torch.device(device).type == "mps" or w.numel() == 0:
        return True
    top = float(np.abs(w.numpy()).max())
    info = torch.finfo(dtype)
    return top == 0.0 or info.tiny / info.eps <= top <= info.max / 16


def placed_weights(w: Tensor, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """Float64 CPU weights ``w`` on ``device`` for rows of ``dtype``: cast to that dtype,
    or kept in float64 where the cast would lose them (:func:`weights_fit`). Plumbing
    that applies one ``w`` to many row blocks places it once per (device, dtype)."""
    return to_device(w, device, dtype if weights_fit(w, dtype, device) else None)


def apply_weights(placed: Tensor, rows: Tensor) -> Tensor:
    """``placedᵀ rows`` in the rows' dtype, for weights from :func:`placed_weights` (in
    float64 when they were kept there)."""
    if placed.dtype == rows.dtype:
        return placed @ rows
    return (placed @ rows.double()).to(rows.dtype)


def weighted_sum(w: Tensor, rows: Tensor) -> Tensor:
    """``wᵀ rows`` in the rows' dtype and device for float64 CPU weights ``w``: with the
    weights cast to that dtype, or in float64 where the cast would lose them
    (:func:`weights_fit`)."""
    return apply_weights(placed_weights(w, rows.dtype, rows.device), rows)


def weights_from_gramian(balancer: Balancer) -> bool:
    """Whether ``balancer`` keeps the base class's ``combine_rows`` and ``weights_for``
    (its direction is ``Gᵀw`` with ``w`` from the Gramian): the plumbing can then hand it
    the Gramian alone and write the direction block by block."""
    cls = type(balancer)
    return cls.combine_rows is Balancer.combine_rows and cls.weights_for is Balancer.weights_for


def gramian(grads: Tensor) -> Tensor:
    """``G Gᵀ`` computed on the gradients' device, returned as float64 on the CPU."""
    return gramian_of_blocks([grads])


def gramian_of_blocks(blocks: Sequence[Tensor]) -> Tensor:
    """``Σ_b B_b B_bᵀ`` (float64, CPU): see :func:`gramian_and_dtype`."""
    return gramian_and_dtype(blocks)[0]


#: A float32 Gramian is redone in float64 when its cosine matrix ``C_ij = A_ij /
#: (|g_i||g_j|)`` has an eigenvalue below ``GRAM_RESOLUTION · K · eps32`` (6e-4 at K = 50):
#: its entries are rounded to a few eps of ``|g_i||g_j|``, so directions that (nearly)
#: cancel (two nearly opposite gradients, the mean of gradients that nearly cancel, K
#: gradients of rank < K) are not resolved in it, and the balancers solved the rounding
#: (UPGrad's weights ~1e6 and a direction in conflict, CAGrad's ``|g0|²`` rounded to 0).
#: Measured on SAC updates (the smallest eigenvalue over the first 2,000 MT10 updates and
#: 300 MT50 updates): critic 1.9e-2 / 8.4e-3, actor 6.3e-3 / 3.0e-3, so training Gramians
#: stay in float32.
GRAM_RESOLUTION = 100.0


def _unresolved(gram: Tensor) -> bool:
    """Whether the float32-formed ``gram`` (float64 values) has directions below its
    rounding (see :data:`GRAM_RESOLUTION`). Zero rows (weight 0 in every balancer) are
    left out. (NumPy: a third of torch's per-call cost on these small matrices.)"""
    a = gram.numpy()
    diag = np.diag(a)
    keep = diag > 1e-20 * float(diag.max())
    k = int(keep.sum())
    if k < 2:
        return False
    sub = a if k == a.shape[0] else a[np.ix_(keep, keep)]
    unit = np.sqrt(np.diag(sub))
    lowest = float(np.linalg.eigvalsh(sub / np.outer(unit, unit))[0])
    return lowest < GRAM_RESOLUTION * k * float(np.finfo(np.float32).eps)


def gramian_and_dtype(blocks: Sequence[Tensor]) -> tuple[Tensor, torch.dtype]:
    """``Σ_b B_b B_bᵀ`` for column blocks ``B_b`` of shape ``(K, d_b)``: the Gramian of
    their concatenation ``[B_1, B_2, ...]`` without forming it. Float64 on the CPU.

    The products run in the blocks' dtype (float32 or float64; a mix runs in float64,
    anything else in float32) on their device. On the CPU:

    * float32 with oneDNN (:func:`mtrl.onednn.gram`, which also uses the symmetry):
      ~3× MKL's speed on CPUs where MKL does not use AVX-512 (measured: 3.9 ms against
      11.3 ms for a 50 × 160,000 block, one thread, AMD EPYC);
    * otherwise, with torch single-threaded, NumPy's ``a @ a.T``, which NumPy hands to
      BLAS ``syrk``: one triangle, half the multiply-adds (6.9 ms for the same block).
      With several torch threads torch's product is used instead: NumPy's BLAS threads
      keep spinning after a call and then compete with torch's for the cores (measured:
      a K = 50 Gramian 4× slower, two threads each on two cores);
      :func:`mtrl.runtime.configure_cpu` sizes both pools.

    Long float32 products run in pieces (:data:`GRAM_CHUNK`, :data:`ONEDNN_GRAM_CHUNK`:
    long float32 sums lose digits); all products are summed in float64. The result is
    symmetrised in float64. A float32 Gramian is redone in float64 where float32 cannot
    hold it: out of range (overflow, underflow) or too coarse for its gradients (nearly
    dependent rows, :data:`GRAM_RESOLUTION`). Returns the Gramian and the dtype its
    products ran in (float64 after a redo), whose epsilon is its precision.
    """
    if not blocks:
        raise ValueError("gramian_of_blocks needs at least one block")
    dtypes = {b.dtype for b in blocks}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float64
    if dtype not in (torch.float32, torch.float64):
        dtype = torch.float32
    on_cpu = all(b.device.type == "cpu" for b in blocks)
    use_numpy = (
        on_cpu
        and torch.get_num_threads() == 1
        and not (dtype == torch.float32 and onednn.enabled())
    )
    total = _gramian_sum(blocks, dtype, use_numpy)
    gram = (total + total.T) * 0.5  # (symmetrised in float64)
    if dtype == torch.float32:
        # float32 overflows beyond |g| ~ 1e19 and loses digits in subnormals below
        # |g|² ~ 1e-20, down to an all-zero Gramian (|g| ~ 1e-23, not zero gradients):
        # redo such (rare) Gramians in float64. The check reads the K×K result, which
        # goes to the CPU anyway.
        dmax = float(total.diagonal().max()) if total.numel() else 1.0
        if (not (math.isfinite(dmax) and bool(torch.isfinite(total).all())) or dmax < 1e-20
                or _unresolved(gram)):
            total = _gramian_sum(blocks, torch.float64, use_numpy)
            gram, dtype = (total + total.T) * 0.5, torch.float64
    return gram, dtype


#: Columns per float32 product when the Gramian is formed by BLAS / cuBLAS (torch's
#: ``bmm``, NumPy's ``syrk``): their float32 sums over long rows round to ~8-10 eps of
#: |g_i||g_j| at 160,000 columns and ~200 eps at 1M (measured), enough to hide that 0 is
#: in the hull of g and -c·g from FairGrad's degeneracy test. Pieces of this many columns,
#: summed in float64, stay below ~1.5 eps (a 4,096-column piece of 50 rows fits a 1 MB L2
#: cache).
GRAM_CHUNK = 4096
#: oneDNN's products are accurate to ~4 eps up to ~160,000 columns (SAC's largest block)
#: but not beyond (~90 eps at 1M): longer blocks go in contiguous pieces of
#: :data:`ONEDNN_GRAM_CHUNK` columns (~0.5 eps; oneDNN reads column slices ~1000× slower
#: than a copy, so the pieces are copied).
ONEDNN_GRAM_LONG, ONEDNN_GRAM_CHUNK = 1 << 18, 1 << 16


def _gramian_sum(blocks: Sequence[Tensor], dtype: torch.dtype, use_numpy: bool) -> Tensor:
    total = None
    for block in blocks:
        g = block.detach()
        if dtype == torch.float64 and g.device.type == "mps":
            g = g.cpu()  # MPS has no float64 (the float32 Gramian's float64 redo)
        g = g.to(dtype)
        k, d = g.shape
        acc = torch.float32 if g.device.type == "mps" else torch.float64  # MPS: no float64
        long32 = dtype == torch.float32 and d > GRAM_CHUNK
        if use_numpy:
            a = g.contiguous().numpy()
            if not long32:
                prod = torch.from_numpy(a @ a.T)  # NumPy recognises the self-product: syrk
            else:  # column pieces, each a syrk, summed in float64
                sums = np.zeros((k, k))
                for j in range(0, d, GRAM_CHUNK):
                    # A column slice is a BLAS operand as it is (row stride = lda), and
                    # NumPy still sees the self-product: no copy (measured: a 50 × 160,000
                    # Gramian 7.7 ms with contiguous copies, 6.8 ms without; one whole
                    # syrk 6.6 ms but ~6 eps, the pieces 0.3 eps).
                    piece = a[:, j : j + GRAM_CHUNK]
                    sums += piece @ piece.T
                prod = torch.from_numpy(sums)
        elif g.device.type == "cpu" and onednn.enabled() and dtype == torch.float32:
            if d <= ONEDNN_GRAM_LONG:
                prod = onednn.gram(g)
            else:
                prod = torch.zeros(k, k, dtype=acc)
                for j in range(0, d, ONEDNN_GRAM_CHUNK):
                    piece = g[:, j : j + ONEDNN_GRAM_CHUNK].contiguous()
                    prod += onednn.gram(piece).to(acc)
        elif not long32:
            prod = g @ g.T
        else:  # strided batched product over the pieces (no copies), summed in float64
            m = d // GRAM_CHUNK
            x = g[:, : m * GRAM_CHUNK].view(k, m, GRAM_CHUNK).transpose(0, 1)
            prod = torch.bmm(x, x.transpose(1, 2)).to(acc).sum(0)
            if d > m * GRAM_CHUNK:
                rest = g[:, m * GRAM_CHUNK :]
                prod += (rest @ rest.T).to(acc)
        prod = prod.to(acc)  # blocks are summed in float64 too
        total = prod if total is None else total.add_(prod)
    return total.to("cpu", torch.float64)


def check_inputs(grads: Tensor, losses: Tensor | None) -> None:
    """Validate ``combine`` arguments with messages a user can act on."""
    if not isinstance(grads, Tensor) or grads.ndim != 2:
        shape = tuple(grads.shape) if isinstance(grads, Tensor) else type(grads).__name__
        raise ValueError(f"grads must be a 2-D tensor (K tasks, D parameters), got {shape}")
    if not grads.is_floating_point():
        raise ValueError(f"grads must be a floating-point tensor, got {grads.dtype}")
    if grads.shape[0] < 1:
        raise ValueError("grads must hold at least one task row (K >= 1)")
    if not torch.isfinite(grads).all():
        raise ValueError("grads contain NaN or Inf; refusing to combine them")
    if losses is not None:
        if not isinstance(losses, Tensor):
            raise ValueError(
                f"losses must be a tensor of shape ({grads.shape[0]},) or None, "
                f"got {type(losses).__name__}"
            )
        if losses.shape != (grads.shape[0],):
            raise ValueError(
                f"losses must have shape ({grads.shape[0]},) to match grads, "
                f"got {tuple(losses.shape)}"
            )
        if not torch.isfinite(losses).all():
            raise ValueError("losses contain NaN or Inf; refusing to combine them")
