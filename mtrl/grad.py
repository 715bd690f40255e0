"""Per-task gradients in one batched pass, the balancer call, and writing ``.grad``.

This module is plumbing only: it does not know which balancer runs, nor anything about
SAC, environments or the command line.

Task-major batches
------------------
Every function here takes ``batch``: a sequence of tensors whose leading dims are
``[K, B/K, ...]`` (block ``k`` holds task ``k``'s samples) and a ``loss_fn`` of the form
``loss_fn(params, *block) -> scalar``: the loss of ONE task computed from that task's block
alone. Because task ``k``'s loss depends on block ``k`` only, ``torch.func.vmap`` over the
blocks of ``torch.func.grad_and_value(loss_fn)`` gives all K task gradients for about the
cost of one ordinary backward pass: the forward and input-gradient matmuls are the same
matmuls as for the whole batch, and the weight-gradient matmuls become batched matmuls over
the K blocks (same FLOPs), whose outputs are the K per-task gradients.

* ``params`` is a ``dict`` name -> tensor, typically ``dict(module.named_parameters())``,
  each tensor once. ``loss_fn`` receives a dict with the same names (stand-ins with the
  same values: detached copies, or fresh leaves; entries with ``requires_grad=False``
  as constants), suitable for ``torch.func.functional_call(module, params, args)``.
  Flattened gradients follow the insertion order of ``params``.
* Everything without a task dimension (the critic parameters inside the actor loss, the
  discount, ...) is captured by ``loss_fn`` as a constant. Constants never receive
  gradients, not even when they have ``requires_grad=True`` or were computed from a
  listed parameter (a buffer derived from it, say): the gradient flows through the
  ``params`` argument only, whatever the balancer kind. (The fallback
  :func:`balanced_backward_from_losses` differentiates its loss graph as it is.)
* Randomness: ``vmap`` runs with ``randomness="error"`` by default, so ``loss_fn`` must not
  draw random numbers. Draw the noise outside (e.g. the reparameterisation noise of the
  policy, shaped ``[K, B/K, act_dim]``) and pass it in ``batch``. ``randomness="different"``
  or ``"same"`` can be passed through where drawing inside is really wanted.
* Operations ``vmap`` has no batching rule for fall back to a slow per-block loop (with a
  warning from torch), and data-dependent Python control flow on tensor values
  (``if loss > 0:``) or ``.item()`` inside ``loss_fn`` is an error under ``vmap``. Use
  :func:`balanced_backward_from_losses` for losses that cannot be written per block.
* Cost depends on the batching rules of the ops in ``loss_fn``: ``F.linear`` / ``addmm``
  with a (task-unbatched) weight fold the K blocks into the rows of one matmul, but
  ``bmm`` / ``baddbmm`` expand the weight to one copy per block (measured: the loss-only
  path of a ``baddbmm`` twin critic costs 2-4× a plain backward at K = 50, against 1× with
  ``addmm`` per ensemble member; see ``scripts/bench_balancers.py``). mtrl's own layers
  (:mod:`mtrl.onednn`: float32 CPU products on oneDNN) have ``vmap`` rules that fold the
  blocks the same way and compute the per-block weight gradients as one product each.

Per-row terms: :func:`balanced_backward_terms`
----------------------------------------------
When each task loss is the mean of per-row terms (SAC's losses are), pass
``terms_fn(params, *rows) -> (N,)`` and the task-major rows instead of blocks. On the CPU
with oneDNN this runs ONE ordinary forward and backward in which :mod:`mtrl.onednn`'s
layers return per-task weight gradients (:func:`mtrl.onednn.block_gradients`): same
products and numbers as the ``vmap`` path, without its bookkeeping (4-5 ms per SAC loss
here). Anywhere else (CUDA, float64, parameters outside those layers) gradient
balancers run the ``vmap`` path of ``balanced_backward(mean_of_terms(terms_fn), ...)``;
loss-only balancers always need just one forward and one backward.

Balancer kinds (see :class:`mtrl.balancers.Balancer`)
----------------------------------------------------
:func:`balanced_backward` asks the balancer what it needs, never its name:

* ``needs_grads is False`` (loss-only, e.g. ``mean``, ``famo``): no Jacobian. One vmapped
  forward gives the K losses, ``w = balancer.weights_for(None, losses)``, and ONE backward
  pass of ``(w * losses).sum()`` accumulates into ``.grad``. Gradient statistics are NaN.
* ``balancer.select(K)`` returns indices (objective sampling, e.g. ``sdmgrad-os``): the
  gradients of those task rows only are computed (the other blocks are not
  differentiated), and ``balancer.combine_rows(grads_sub, losses_sub)`` gives the
  direction. The losses of the other tasks are still reported, from a cheap no-grad
  forward of their blocks. ``select`` runs before the gradients exist, so when they turn
  out non-finite (``FloatingPointError``) the sampler's generator has already moved: a
  caller that skips such a step and wants the exact balancer state back restores it from
  a ``state_dict()`` snapshot (:class:`mtrl.agents.MultiTaskSAC` does).
* Otherwise all K gradient rows are computed and ``balancer.combine_rows(grads, losses)``
  gives the direction.

For balancers that keep the base class's ``combine_rows`` and ``weights_for`` (the
direction is ``Gᵀw``), the rows are never concatenated: the Gramian is the sum of
per-parameter Gramians, the balancer gets it through ``weights_for(None, losses,
gram=...)``, and each parameter's ``.grad`` is ``wᵀ`` times its own block. Same
numbers, one (K, D) copy less (measured: ~90 ms of a ~350 ms SAC update at K = 50 on
one CPU thread).

Memory: the per-task gradients are dense per-parameter ``(K, numel)`` blocks, ``K × D``
values in all: 143 MB in float32 for the SAC twin critic (D ≈ 0.72 M) at K = 50 (twice
that, briefly, for a balancer with its own ``combine_rows``, which gets one concatenated
matrix). ``chunk_size`` bounds the vmap's intermediate memory if needed.

``.grad`` semantics: like ``Tensor.backward()``, the direction is ADDED to ``p.grad`` when
it is already set, and ``p.grad`` is set otherwise (then it is a view into the
direction the balancer returned, or the parameter's own block ``wᵀ G_p`` on the
blockwise path; no extra copy is made). Zero the gradients first (``optimizer.zero_grad()``)
for a plain update.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap

from mtrl import onednn
from mtrl.balancers.base import (
    Balancer,
    apply_weights,
    gramian_and_dtype,
    placed_weights,
    to_device,
    weights_from_gramian,
)

__all__ = [
    "BalanceStats",
    "TaskLossFn",
    "TermsFn",
    "balanced_backward",
    "balanced_backward_from_losses",
    "balanced_backward_terms",
    "gram_stats",
    "mean_of_terms",
    "task_gradients",
    "task_losses",
]

#: ``f(params: dict[str, Tensor], *block: Tensor) -> Tensor`` (a scalar): the loss of ONE
#: task computed from its own block of the batch.
TaskLossFn = Callable[..., Tensor]
#: ``f(params: dict[str, Tensor], *rows: Tensor) -> Tensor`` of shape ``(N,)``: one term
#: per data row (see :func:`balanced_backward_terms`).
TermsFn = Callable[..., Tensor]


class BalanceStats(NamedTuple):
    """What one balanced backward did, as tensors on the loss device (no host sync).

    Entries that were not computed are NaN, never silently zero:

    * loss-only balancers (``needs_grads is False``) compute no Jacobian, so
      ``grad_norms``, ``mean_cosine`` and ``conflict_fraction`` are all NaN;
    * with objective sampling, ``grad_norms`` is NaN for the tasks not sampled, and the
      cosine / conflict statistics are over the pairs of sampled tasks;
    * ``mean_cosine`` and ``conflict_fraction`` are NaN with fewer than two rows;
    * ``weights`` is NaN when the balancer did not report weights in
      ``balancer.info["weights"]`` (a method whose direction is not ``Gᵀw``, e.g. PCGrad).
    """

    #: (K,) task losses, detached, in the loss dtype.
    losses: Tensor
    #: (K,) float32: the weights the balancer applied (0 for tasks not sampled).
    weights: Tensor
    #: (K,) float32: the norm of each task's gradient (NaN where not computed).
    grad_norms: Tensor
    #: () float32: mean cosine similarity over pairs of task gradients (a zero gradient
    #: counts as cosine 0).
    mean_cosine: Tensor
    #: () float32: fraction of task pairs whose gradients have a negative inner product.
    conflict_fraction: Tensor


# ---------------------------------------------------------------------------- helpers
def _num_tasks(batch: Sequence[Tensor]) -> int:
    if isinstance(batch, Tensor) or not isinstance(batch, Sequence) or len(batch) == 0:
        raise ValueError(
            "batch must be a non-empty sequence of tensors shaped [K, B/K, ...] "
            f"(a tuple or list), got {type(batch).__name__}"
        )
    for i, t in enumerate(batch):
        if not isinstance(t, Tensor) or t.ndim < 1:
            what = f"shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(
                f"batch[{i}] must be a tensor with a leading task dimension K, got {what}; "
                "capture constants in loss_fn instead of passing them in the batch"
            )
    k = batch[0].shape[0]
    if any(t.shape[0] != k for t in batch):
        shapes = ", ".join(str(tuple(t.shape)) for t in batch)
        raise ValueError(f"all batch tensors must share the leading task dimension K; got {shapes}")
    if k < 1:
        raise ValueError("batch must hold at least one task block (K >= 1)")
    return k


def _check_params(params: Mapping[str, Tensor]) -> None:
    if not isinstance(params, Mapping) or len(params) == 0:
        raise ValueError(
            "params must be a non-empty dict name -> tensor, e.g. dict(module.named_parameters())"
        )
    _check_distinct(params.values())


def _check_distinct(tensors: Iterable[Tensor]) -> None:
    seen: set[int] = set()
    for t in tensors:
        if id(t) in seen:
            raise ValueError(
                "params name the same tensor twice (tied weights): give each parameter "
                "once, as dict(module.named_parameters()) does"
            )
        seen.add(id(t))


Merge = Callable[[Mapping[str, Tensor]], dict[str, Tensor]]


def _merger(params: Mapping[str, Tensor], trainable: Mapping[str, Tensor]) -> Merge:
    """``merge(values)``: the dict ``loss_fn`` gets, in the caller's order of ``params``:
    ``values`` for the differentiated entries, the others as detached constants."""
    frozen = {name: p.detach() for name, p in params.items() if name not in trainable}
    names = list(params)

    def merge(values: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {n: values[n] if n in values else frozen[n] for n in names}

    return merge


def _leaves(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Fresh leaves with the parameters' values: ``loss_fn`` differentiated through its
    ``params`` argument only, as under ``torch.func`` (tensors it captures, and graphs
    behind them, are constants on every path)."""
    return {name: p.detach().requires_grad_() for name, p in params.items()}


def _trainable(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The entries of ``params`` that require grad (frozen ones are left alone, as by autograd)."""
    _check_params(params)
    out = {name: p for name, p in params.items() if p.requires_grad}
    if not out:
        raise ValueError("none of the given params requires grad; nothing to differentiate")
    return out


def _check_indices(idx: Tensor, num_tasks: int, what: str) -> Tensor:
    if not isinstance(idx, Tensor) or idx.ndim != 1 or idx.numel() == 0:
        raise ValueError(f"{what} must be a non-empty 1-D tensor of task indices, got {idx!r}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{what} must be an integer tensor, got {idx.dtype}")
    if idx.device.type == "cpu":  # free to check; on an accelerator it would need a sync
        if int(idx.min()) < 0 or int(idx.max()) >= num_tasks:
            raise ValueError(f"{what} must lie in [0, {num_tasks}), got {idx.tolist()}")
        if torch.unique(idx).numel() != idx.numel():
            raise ValueError(f"{what} must not repeat a task, got {idx.tolist()}")
    return idx.long()


def _in_dims(batch: Sequence[Tensor]) -> tuple[int | None, ...]:
    return (None, *([0] * len(batch)))


def _write_grads(params: Sequence[Tensor], direction: Tensor) -> None:
    """Split the flat ``direction`` (D,) into parameter shapes; add to / set ``.grad``."""
    direction = direction.detach()
    total = sum(p.numel() for p in params)
    if direction.shape != (total,):
        raise ValueError(
            f"the balancer returned a direction of shape {tuple(direction.shape)}, "
            f"expected ({total},) for these parameters"
        )
    offset = 0
    for p in params:
        n = p.numel()
        _accumulate_grad(p, direction[offset : offset + n])
        offset += n


def _write_grad_pieces(params: Sequence[Tensor], w: Tensor, pieces: Sequence[Tensor]) -> None:
    """Add / set ``.grad`` of each parameter to ``wᵀ piece`` (its block of ``Gᵀw``)."""
    on: dict[tuple[torch.device, torch.dtype], Tensor] = {}  # w copied once per place
    for p, piece in zip(params, pieces, strict=True):
        key = (piece.device, piece.dtype)
        if key not in on:  # (float64 where the piece's dtype would lose the weights)
            on[key] = placed_weights(w, piece.dtype, piece.device)
        _accumulate_grad(p, apply_weights(on[key], piece))


def _accumulate_grad(p: Tensor, flat: Tensor) -> None:
    """Add ``flat`` (p.numel(),) to ``p.grad``, or set ``p.grad`` to it (as a view)."""
    g = flat.view(p.shape)
    if g.dtype != p.dtype or g.device != p.device:
        g = g.to(device=p.device, dtype=p.dtype)
    if p.grad is None:
        p.grad = g
    else:
        p.grad.add_(g)


def _concat_rows(pieces: Sequence[Tensor]) -> Tensor:
    """Per-parameter ``(rows, numel)`` blocks -> one ``(rows, D)`` matrix."""
    return pieces[0] if len(pieces) == 1 else torch.cat(list(pieces), dim=1)


def _fresh_info(balancer: Balancer) -> dict:
    """The balancer's ``info`` dict with last call's ``weights`` / ``gram`` removed.

    So that what is read back after the call belongs to this call (a balancer that does
    not report weights must not have stale ones logged).
    """
    info = getattr(balancer, "info", None)
    if not isinstance(info, dict):
        return {}
    info.pop("weights", None)
    info.pop("gram", None)
    return info


def _nan(shape: tuple[int, ...], device: torch.device) -> Tensor:
    return torch.full(shape, float("nan"), dtype=torch.float32, device=device)


def _scatter(values: Tensor | None, idx: Tensor | None, k: int, fill: float, device) -> Tensor:
    """Place ``values`` (rows ``idx`` or all) into a (K,) float32 vector filled with ``fill``."""
    if values is None:
        return _nan((k,), device)
    values = to_device(values, device, torch.float32)
    if idx is None:
        return values
    out = torch.full((k,), fill, dtype=torch.float32, device=device)
    return out.index_copy_(0, to_device(idx, device), values)


def _applied_weights(info: dict, rows: int) -> Tensor | None:
    w = info.get("weights")
    if isinstance(w, Tensor) and w.shape == (rows,):
        return w
    return None


def _reused_gram(info: dict, rows: int) -> Tensor | None:
    g = info.get("gram")
    if isinstance(g, Tensor) and g.shape == (rows, rows):
        return g
    return None


def gram_stats(gram: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_norms (k,), mean_cosine (), conflict_fraction ())`` from a k×k Gramian.

    Pairs are the ``k (k - 1) / 2`` unordered pairs of distinct rows; with ``k < 2`` the
    pair statistics are NaN. A zero gradient has cosine 0 with everything.
    """
    gram = gram.detach().to(torch.float64)  # float32 only for the results (range)
    k = gram.shape[0]
    norms = gram.diagonal().clamp_min(0).sqrt()
    if k < 2:
        nan = torch.full((), float("nan"), dtype=torch.float32, device=gram.device)
        return norms.float(), nan, nan.clone()
    i, j = torch.triu_indices(k, k, offset=1, device=gram.device)
    inner = gram[i, j]
    denom = norms[i] * norms[j]
    cos = torch.where(denom > 0, inner / denom.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return norms.float(), cos.mean().float(), (inner < 0).float().mean()


# ---------------------------------------------------------------------------- public API
def task_losses(
    loss_fn: TaskLossFn,
    params: Mapping[str, Tensor],
    batch: Sequence[Tensor],
    *,
    randomness: str = "error",
    chunk_size: int | None = None,
) -> Tensor:
    """The K task losses ``(K,)`` from one vmapped forward; differentiable w.r.t. ``params``."""
    _check_params(params)
    _num_tasks(batch)
    fn = vmap(loss_fn, in_dims=_in_dims(batch), randomness=randomness, chunk_size=chunk_size)
    losses = fn(dict(params), *batch)
    if not isinstance(losses, Tensor) or losses.ndim != 1:
        raise ValueError("loss_fn must return a scalar tensor (the loss of one task's block)")
    return losses


def task_gradients(
    loss_fn: TaskLossFn,
    params: Mapping[str, Tensor],
    batch: Sequence[Tensor],
    tasks: Tensor | None = None,
    *,
    randomness: str = "error",
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Losses ``(K',)`` and flattened per-task gradients ``(K', D)`` in one batched pass.

    ``tasks`` (1-D integer tensor) restricts the computation to those task rows, in that
    order; ``K' = len(tasks)`` (all K tasks when ``None``). Columns follow ``params``'
    insertion order, each parameter flattened row-major. Results are detached.
    ``chunk_size`` is passed to ``vmap`` (lower peak memory, slower).
    """
    _check_params(params)
    k = _num_tasks(batch)
    if tasks is not None:
        tasks = _check_indices(tasks, k, "tasks")
    losses, pieces = _task_gradient_pieces(
        loss_fn, params, batch, tasks, randomness=randomness, chunk_size=chunk_size
    )
    return losses, _concat_rows(pieces)


def _task_gradient_pieces(
    loss_fn: TaskLossFn,
    params: Mapping[str, Tensor],
    batch: Sequence[Tensor],
    tasks: Tensor | None,
    *,
    randomness: str,
    chunk_size: int | None,
    merge: Merge | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Losses ``(K',)`` and per-parameter gradient blocks ``(K', numel)`` (views, no copy)."""
    if merge is not None:  # entries not differentiated still reach loss_fn, as constants
        inner = loss_fn

        def loss_fn(trainable: dict[str, Tensor], *block: Tensor) -> Tensor:
            return inner(merge(trainable), *block)

    if tasks is not None:
        batch = [t.index_select(0, to_device(tasks, t.device)) for t in batch]
    rows = batch[0].shape[0]
    detached = {name: p.detach() for name, p in params.items()}
    fn = vmap(
        grad_and_value(loss_fn),
        in_dims=_in_dims(batch),
        randomness=randomness,
        chunk_size=chunk_size,
    )
    # torch.func.grad ignores an outer no_grad for its own level, so the gradients are
    # computed; the no_grad only stops an outer graph being recorded through constants
    # captured by loss_fn that happen to require grad.
    with torch.no_grad():
        grads, losses = fn(detached, *batch)
    return losses, [grads[name].reshape(rows, -1) for name in detached]


def balanced_backward(
    loss_fn: TaskLossFn,
    params: Mapping[str, Tensor],
    batch: Sequence[Tensor],
    balancer: Balancer,
    *,
    diagnostics: bool = True,
    randomness: str = "error",
    chunk_size: int | None = None,
) -> BalanceStats:
    """Compute what ``balancer`` needs, call it, and add the direction to ``.grad``.

    ``params`` is a dict name -> parameter (e.g. ``dict(module.named_parameters())``); only
    these receive gradients, and entries with ``requires_grad=False`` are skipped
    altogether (not differentiated, no ``.grad``), as ``Tensor.backward`` would. See the
    module docstring for the three balancer kinds and the ``.grad`` accumulation rule.

    Balancers that keep the base class's ``combine_rows`` (direction ``Gᵀw``) never see
    the rows as one matrix: the Gramian is summed over per-parameter blocks and the
    direction is written block by block, which saves a (K, D) copy; the statistics then
    come from that Gramian for free. A balancer with its own ``combine_rows`` gets the
    (K, D) matrix; ``diagnostics=False`` then skips the extra Gramian the statistics
    need (they are NaN), unless the balancer records the Gramian of the rows it was
    given in ``balancer.info["gram"]``. The extra Gramian costs ``K² D`` FLOPs, about as
    much as the backward pass itself at K = 50, so pass ``False`` on steps that do not
    log.
    """
    all_params = params
    params = _trainable(all_params)
    merge = _merger(all_params, params)
    k = _num_tasks(batch)
    param_list = list(params.values())
    idx = balancer.select(k)
    if idx is not None:
        idx = _check_indices(idx, k, f"{type(balancer).__name__}.select({k})")
    info = _fresh_info(balancer)
    vkw = {"randomness": randomness, "chunk_size": chunk_size}

    if not balancer.needs_grads:
        leaves = _leaves(params)
        losses = task_losses(loss_fn, merge(leaves), batch, **vkw)
        if idx is not None:
            used = losses.index_select(0, to_device(idx, losses.device))
        else:
            used = losses
        return _loss_only_backward(balancer, losses, used, idx, param_list,
                                   leaves=list(leaves.values()))  # fmt: skip

    losses_rows, pieces = _task_gradient_pieces(loss_fn, params, batch, idx, merge=merge,
                                                **vkw)  # fmt: skip
    grads, gram = _combine_pieces(balancer, param_list, pieces, losses_rows)

    if idx is None:
        losses = losses_rows
    else:
        losses = _all_losses(k, idx, losses_rows, lambda rest: task_losses(
            loss_fn, merge(params), [t.index_select(0, to_device(rest, t.device)) for t in batch],
            **vkw,
        ))  # fmt: skip
    return _stats(losses, grads, idx, info, diagnostics, gram)


def mean_of_terms(terms_fn: TermsFn) -> TaskLossFn:
    """The :data:`TaskLossFn` whose task loss is the mean of ``terms_fn``'s per-row terms."""

    def loss_fn(params: dict[str, Tensor], *block: Tensor) -> Tensor:
        terms = terms_fn(params, *block)
        _check_terms(terms, block[0].shape[0] if block else -1)
        return terms.mean()

    return loss_fn


def balanced_backward_terms(
    terms_fn: TermsFn,
    params: Mapping[str, Tensor],
    data: Sequence[Tensor],
    num_tasks: int,
    balancer: Balancer,
    *,
    diagnostics: bool = True,
    fast_path: bool = True,
    verify: bool = False,
) -> BalanceStats:
    """:func:`balanced_backward` for task losses that are means of per-row terms.

    ``data`` are tensors of ``N`` rows, task-major: rows ``[k N/K, (k+1) N/K)`` belong
    to task ``k`` (``N`` divisible by ``K = num_tasks``), and ``terms_fn(params, *data)``
    returns the ``(N,)`` per-row terms (row ``i`` from row ``i`` of the data only, no
    random draws). Task ``k``'s loss is the mean of its rows' terms. The result is that
    of ``balanced_backward(mean_of_terms(terms_fn), params, blocks, balancer)`` with
    ``blocks`` the data viewed as ``[K, N/K, ...]`` (up to float32 rounding), and for
    gradient balancers that is what runs unless the fast path below applies.

    Fast path (float32 on the CPU with oneDNN, gradient balancers, ``fast_path=True``):
    ONE ordinary forward of the batch and ONE ordinary backward, no ``torch.func``; the
    :mod:`mtrl.onednn` layers return per-task weight gradients directly
    (:func:`mtrl.onednn.block_gradients`). Same products, so the same numbers up to
    float32 rounding; measured on the SAC actor and critic it saves the 4-5 ms of
    ``torch.func`` bookkeeping per call (``scripts/bench_balancers.py``). It needs

    * every parameter in ``params`` to be used only by those layers (checked: otherwise
      the ``vmap`` path runs, after a wasted forward), and
    * the row contract, which is NOT checked by default: inside ``terms_fn``, a layer
      input with exactly as many rows as the data passed (``N``, or the sampled tasks'
      rows under objective sampling) must hold the data rows in data order, row ``i``
      computed from data row ``i`` only (``torch.cat([obs, action], 1)``, hidden
      activations). A reordering of the rows, or another tensor that happens to have that
      many rows (a table of K task embeddings, say), credits gradients to the wrong
      tasks. The SAC agent's losses meet the contract.

    ``verify=True`` checks the contract on this call with one extra ordinary forward and
    backward: for random task coefficients ``c`` it compares ``Σ_k c_k g_k`` from the
    fast path with the gradient of ``Σ_k c_k loss_k`` and raises ``ValueError`` when they
    differ (use it once on a new model). ``fast_path=False`` always takes the ``vmap``
    path.
    Loss-only balancers need no per-task gradients: one forward, one backward.
    """
    all_params = params
    params = _trainable(all_params)
    merge = _merger(all_params, params)
    if not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks must be a positive integer, got {num_tasks!r}")
    k = num_tasks
    n = _num_rows(data)
    if n % k:
        raise ValueError(
            f"the {n} rows of data must split into {k} equal task blocks (N divisible by K)"
        )
    param_list = list(params.values())
    idx = balancer.select(k)
    if idx is not None:
        idx = _check_indices(idx, k, f"{type(balancer).__name__}.select({k})")
    info = _fresh_info(balancer)

    if not balancer.needs_grads:
        leaves = _leaves(params)
        losses = _block_means(terms_fn(merge(leaves), *data), k, n)
        used = losses if idx is None else losses.index_select(0, to_device(idx, losses.device))
        return _loss_only_backward(balancer, losses, used, idx, param_list,
                                   leaves=list(leaves.values()))  # fmt: skip

    found = None
    if fast_path and _blocks_apply(params):  # (the sampled rows' data only for this path)
        rows_data = data if idx is None else [_take_blocks(t, idx, k) for t in data]
        rows = k if idx is None else idx.numel()
        found = _block_pieces(terms_fn, params, rows_data, rows, merge)
    if found is not None and verify:
        _verify_blocks(terms_fn, params, rows_data, *found, merge)
    if found is None:
        blocks = [t.reshape(k, n // k, *t.shape[1:]) for t in data]
        losses_rows, pieces = _task_gradient_pieces(
            mean_of_terms(terms_fn), params, blocks, idx, randomness="error", chunk_size=None,
            merge=merge,
        )
    else:
        losses_rows, pieces = found
    grads, gram = _combine_pieces(balancer, param_list, pieces, losses_rows)

    if idx is None:
        losses = losses_rows
    else:
        losses = _all_losses(k, idx, losses_rows, lambda rest: _block_means(
            terms_fn(merge(params), *[_take_blocks(t, rest, k) for t in data]),
            rest.numel(),
            rest.numel() * (n // k),
        ))  # fmt: skip
    return _stats(losses, grads, idx, info, diagnostics, gram)


def _num_rows(data: Sequence[Tensor]) -> int:
    if isinstance(data, Tensor) or not isinstance(data, Sequence) or len(data) == 0:
        raise ValueError(
            "data must be a non-empty sequence of tensors with N rows each (a tuple or list), "
            f"got {type(data).__name__}"
        )
    if any(not isinstance(t, Tensor) or t.ndim < 1 for t in data):
        raise ValueError("every data entry must be a tensor with a leading row dimension N")
    n = data[0].shape[0]
    if any(t.shape[0] != n for t in data):
        shapes = ", ".join(str(tuple(t.shape)) for t in data)
        raise ValueError(f"all data tensors must have the same number of rows; got {shapes}")
    return n


def _check_terms(terms: Tensor, rows: int) -> None:
    if not isinstance(terms, Tensor) or tuple(terms.shape) != (rows,):
        what = tuple(terms.shape) if isinstance(terms, Tensor) else type(terms).__name__
        raise ValueError(
            f"terms_fn must return one term per data row, shape ({rows},), got {what}"
        )


def _block_means(terms: Tensor, blocks: int, rows: int) -> Tensor:
    """Means of ``blocks`` equal, consecutive blocks of the ``(rows,)`` terms."""
    _check_terms(terms, rows)
    return terms.view(blocks, -1).mean(1)


def _take_blocks(t: Tensor, idx: Tensor, k: int) -> Tensor:
    """Rows of the task blocks ``idx`` of the task-major ``t`` (N rows), in that order."""
    blocks = t.reshape(k, t.shape[0] // k, *t.shape[1:])
    return blocks.index_select(0, to_device(idx, t.device)).reshape(-1, *t.shape[1:])


def _blocks_apply(params: dict[str, Tensor]) -> bool:
    """Whether :func:`_block_pieces` can apply: oneDNN on, float32 CPU parameters."""
    return onednn.enabled() and all(
        p.dtype == torch.float32 and p.device.type == "cpu" for p in params.values()
    )


def _block_pieces(
    terms_fn: TermsFn,
    params: dict[str, Tensor],
    data: Sequence[Tensor],
    blocks: int,
    merge: Merge,
) -> tuple[Tensor, list[Tensor]] | None:
    """Losses ``(blocks,)`` and per-parameter ``(blocks, numel)`` gradients from one
    forward and one backward with :func:`mtrl.onednn.block_gradients`, or ``None`` when
    some parameter is not covered by its layers (the caller then uses ``vmap``). Call it
    only where :func:`_blocks_apply` holds (elsewhere the layers would not record)."""
    n = data[0].shape[0]
    with onednn.block_gradients(blocks, n) as recorded:
        terms = terms_fn(merge(params), *data)
    covered = {id(p) for p, _ in recorded}
    if any(id(p) not in covered for p in params.values()):
        return None
    losses = _block_means(terms, blocks, n)
    probes = [probe for _, probe in recorded]
    out = torch.autograd.grad(losses.sum(), [*probes, *params.values()], allow_unused=True)
    if any(g is not None for g in out[len(probes) :]):
        return None  # a parameter is also used outside those layers
    per_param: dict[int, Tensor] = {}
    for (p, probe), g in zip(recorded, out, strict=False):
        g = torch.zeros(probe.shape, dtype=p.dtype, device=p.device) if g is None else g
        per_param[id(p)] = g if id(p) not in per_param else per_param[id(p)] + g
    pieces = [per_param[id(p)].reshape(blocks, -1) for p in params.values()]
    return losses.detach(), pieces


def _verify_blocks(
    terms_fn: TermsFn,
    params: dict[str, Tensor],
    data: Sequence[Tensor],
    losses: Tensor,
    pieces: Sequence[Tensor],
    merge: Merge,
    rtol: float = 1e-4,
) -> None:
    """Check the fast path's per-block gradients against an ordinary backward.

    With fixed random coefficients ``c`` (their own generator: the global RNG is not
    touched), ``Σ_k c_k pieces[k]`` must equal the gradient of ``Σ_k c_k loss_k`` from a
    plain forward of the same rows, to ``rtol`` of its norm; the losses must agree too
    (they differ when ``terms_fn`` draws random numbers). Raises ``ValueError``.
    """
    blocks = losses.shape[0]
    c = torch.randn(blocks, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plist = list(params.values())
    with torch.enable_grad():
        ref_losses = _block_means(terms_fn(merge(params), *data), blocks, data[0].shape[0])
        objective = (c.to(ref_losses) * ref_losses).sum()
        ref = torch.autograd.grad(objective, plist, allow_unused=True)
    err2 = scale2 = 0.0
    for piece, r in zip(pieces, ref, strict=True):
        got = c.to(piece) @ piece
        want = torch.zeros_like(got) if r is None else r.detach().reshape(-1).to(got)
        err2 += float((got - want).double().square().sum())
        scale2 += float(want.double().square().sum())
    rel = (err2 / scale2) ** 0.5 if scale2 > 0 else (0.0 if err2 == 0 else float("inf"))
    loss_ok = torch.allclose(ref_losses.detach(), losses, rtol=1e-5, atol=1e-6)
    if rel > rtol or not loss_ok:
        what = (
            f"the per-task gradients differ from an ordinary backward by {rel:.3g} (relative)"
            if rel > rtol
            else "the task losses differ between two forwards (random draws in terms_fn?)"
        )
        raise ValueError(
            f"balanced_backward_terms(verify=True): {what}. terms_fn breaks the row "
            "contract of the fast path: every mtrl layer input with as many rows as the "
            "data must be the data rows in data order (no reordering, no other tensor "
            "with that row count), and terms must not be random. Fix terms_fn, or pass "
            "fast_path=False to use the vmap path."
        )


def _loss_only_backward(
    balancer: Balancer,
    losses: Tensor,
    used: Tensor,
    idx: Tensor | None,
    params: Sequence[Tensor],
    *,
    retain_graph: bool = False,
    leaves: Sequence[Tensor] | None = None,
) -> BalanceStats:
    """Loss-only balancers: ``w`` from the (used) losses, ONE backward of ``Σ w_k L_k``.

    With ``leaves`` (the stand-ins the losses were computed from, see :func:`_leaves`)
    the gradient is taken with respect to them and added to the parameters' ``.grad``."""
    k, device = losses.shape[0], losses.device
    w = balancer.weights_for(None, used.detach())
    w_dev = to_device(w, used.device, used.dtype)
    objective = (w_dev * used).sum()
    if leaves is None:
        torch.autograd.backward(objective, inputs=list(params), retain_graph=retain_graph)
    else:
        # a backward into the leaves (AccumulateGrad gives each leaf its own tensor, where
        # autograd.grad may return one tensor for two inputs that meet in a sum, and keeps
        # sparse gradients), then moved over to the parameters
        torch.autograd.backward(objective, inputs=list(leaves), retain_graph=retain_graph)
        for p, leaf in zip(params, leaves, strict=True):  # unused: zero, as on the vmap path
            g = torch.zeros_like(p) if leaf.grad is None else leaf.grad
            if p.grad is None:
                p.grad = g
            elif p.grad.is_sparse and not g.is_sparse:
                p.grad = g + p.grad  # (dense + sparse: torch has no sparse + dense)
            else:
                p.grad.add_(g)
    return BalanceStats(
        losses=losses.detach(),
        weights=_scatter(w_dev, idx, k, 0.0, device),
        grad_norms=_nan((k,), device),
        mean_cosine=_nan((), device),
        conflict_fraction=_nan((), device),
    )


def _all_losses(
    k: int, idx: Tensor, losses_rows: Tensor, losses_of: Callable[[Tensor], Tensor]
) -> Tensor:
    """Losses of all K tasks in task order: the rows ``idx`` given, the others from
    ``losses_of(rest)`` (the losses of tasks ``rest``) run without gradients."""
    device = losses_rows.device
    losses = torch.empty(k, dtype=losses_rows.dtype, device=device)
    losses.index_copy_(0, to_device(idx, device), losses_rows)
    if idx.numel() < k:
        mask = torch.ones(k, dtype=torch.bool)
        mask[idx.cpu()] = False
        rest = mask.nonzero().squeeze(1)
        with torch.no_grad():
            rest_losses = losses_of(rest)
        losses.index_copy_(0, to_device(rest, device), rest_losses.to(losses.dtype))
    return losses


def _stats(
    losses: Tensor,
    grads: Tensor | None,
    idx: Tensor | None,
    info: dict,
    diagnostics: bool,
    gram: Tensor | None = None,
) -> BalanceStats:
    """Statistics from ``gram`` (the rows' Gramian) if given, else from ``grads``."""
    k, device = losses.shape[0], losses.device
    rows = gram.shape[0] if gram is not None else grads.shape[0]
    w = _applied_weights(info, rows)
    if gram is None:
        gram = _reused_gram(info, rows)
    if gram is None and diagnostics:
        g = grads.detach()
        gram = g @ g.T
    if gram is not None:  # K×K statistics on the CPU in float64 (MPS has no float64)
        norms, mean_cos, conflict = gram_stats(gram.detach().to("cpu", torch.float64))
        # the statistics and the weights go to the device as ONE (non-blocking) copy
        parts = [norms, mean_cos.reshape(1), conflict.reshape(1)]
        if w is not None:
            parts.append(w.detach().to("cpu", torch.float32))
        packed = to_device(torch.cat(parts), device)
        grad_norms = _scatter(packed[:rows], idx, k, float("nan"), device)
        mean_cos, conflict = packed[rows], packed[rows + 1]
        if w is not None:
            w = packed[rows + 2 :]
    else:
        grad_norms, mean_cos, conflict = _nan((k,), device), _nan((), device), _nan((), device)
    return BalanceStats(
        losses=losses.detach(),
        weights=_scatter(w, idx, k, 0.0, device) if w is not None else _nan((k,), device),
        grad_norms=grad_norms,
        mean_cosine=mean_cos,
        conflict_fraction=conflict,
    )


def balanced_backward_from_losses(
    task_losses: Tensor,
    params: Sequence[Tensor],
    balancer: Balancer,
    *,
    diagnostics: bool = True,
    retain_graph: bool = False,
) -> BalanceStats:
    """Fallback for losses that cannot be written per task block.

    ``task_losses`` is a differentiable ``(K,)`` vector (any graph), ``params`` the tensors
    to differentiate. The per-task gradients come from ONE batched backward,
    ``torch.autograd.grad(task_losses, params, grad_outputs=I_K, is_grads_batched=True)``
    (only the rows chosen by ``balancer.select`` when it samples); this is a vmapped
    backward over the whole graph, so it costs up to K ordinary backward passes in FLOPs,
    not one: prefer :func:`balanced_backward` when the loss is separable by task block.
    Loss-only balancers need no Jacobian: one backward of ``(w * task_losses).sum()``.
    Same ``.grad`` rule and statistics as :func:`balanced_backward`.
    """
    if not isinstance(task_losses, Tensor) or task_losses.ndim != 1 or task_losses.numel() == 0:
        raise ValueError("task_losses must be a non-empty 1-D tensor (K,)")
    param_list = [p for p in params if p.requires_grad]
    _check_distinct(param_list)
    if not param_list:
        raise ValueError("params must be a non-empty sequence of tensors that require grad")
    k, device = task_losses.shape[0], task_losses.device
    idx = balancer.select(k)
    if idx is not None:
        idx = _check_indices(idx, k, f"{type(balancer).__name__}.select({k})").to(device)
    info = _fresh_info(balancer)
    used = task_losses if idx is None else task_losses.index_select(0, idx)

    if not balancer.needs_grads:
        return _loss_only_backward(
            balancer, task_losses, used, idx, param_list, retain_graph=retain_graph
        )

    eye = torch.eye(k, dtype=task_losses.dtype, device=device)
    if idx is not None:
        eye = eye.index_select(0, idx)
    rows = eye.shape[0]
    per_param = torch.autograd.grad(
        task_losses,
        param_list,
        grad_outputs=eye,
        is_grads_batched=True,
        allow_unused=True,
        retain_graph=retain_graph,
    )
    per_param = [
        g if g is not None else torch.zeros((rows, *p.shape), dtype=p.dtype, device=p.device)
        for g, p in zip(per_param, param_list, strict=True)
    ]
    pieces = [g.reshape(rows, -1) for g in per_param]
    grads, gram = _combine_pieces(balancer, param_list, pieces, used.detach())
    return _stats(task_losses.detach(), grads, idx, info, diagnostics, gram)


def _combine_pieces(
    balancer: Balancer, params: Sequence[Tensor], pieces: list[Tensor], losses: Tensor
) -> tuple[Tensor | None, Tensor | None]:
    """Call the balancer on per-parameter gradient blocks and write ``.grad``.

    A balancer that keeps the base class's ``combine_rows`` and ``weights_for``
    (direction ``Gᵀw``) never sees the rows as one matrix: the Gramian is summed over the
    blocks and the direction written block by block (same numbers, one (K, D) copy
    less). Returns ``(None, gram)`` then, and ``(grads, None)`` when the balancer got the
    (K, D) matrix.
    """
    if weights_from_gramian(balancer):
        gram, formed = gramian_and_dtype(pieces)
        w = balancer.weights_for(None, losses, gram=gram, grads_dtype=formed)
        _write_grad_pieces(params, w, pieces)
        return None, gram
    grads = _concat_rows(pieces)
    _write_grads(params, balancer.combine_rows(grads, losses))
    return grads, None
