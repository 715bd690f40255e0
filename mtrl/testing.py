"""Property checks every balancer should pass, for built-ins and plug-ins alike.

Usage (in a plug-in's own test suite)::

    from mtrl.testing import check_balancer

    def test_my_balancer():
        check_balancer(MyBalancer)              # a class or any zero-argument factory
        check_balancer(lambda: MyBalancer(x=2))
        check_balancer("my-balancer")           # a registered / entry-point name

A failed property raises ``AssertionError`` with a message naming the balancer and the
property. Each check runs on a fresh balancer (a new instance from the factory, or a
deep copy of a given instance), so state such as carried weights or a sampler's generator
never leaks from one check into another.

Properties whose truth depends on the method are declared by class attributes of
:class:`mtrl.balancers.Balancer`:

* ``permutation_equivariant`` (default True): permuting the task rows and losses leaves
  the output unchanged. Set it to False for random task orders or objective sampling.
* ``scale_degree`` (default 1.0): scaling every gradient by ``s > 0`` scales the output by
  ``s ** scale_degree``; ``None`` skips the check.
* ``consensus_exact`` (default True): K=1, or K identical rows, return that row exactly
  (mean scale). When False only a positive multiple of the row is required.
* ``reads_losses`` (default True): when False, other loss values must give the same
  output (the plumbing then does not copy the losses to the host).

Besides those: two copies of one instance agree on the same input (random state lives in
the balancer); NaN/Inf gradients or losses raise ``ValueError``; the state survives
``state_dict()`` over several calls; ``combine(grads)`` without losses works (or raises
``ValueError``); and the training plumbing (``select()``, then ``weights_for(gram=...)`` or
``combine_rows`` on the selected rows, as :mod:`mtrl.grad` calls them) gives the same
direction as ``combine``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from mtrl.balancers.base import Balancer, weights_from_gramian
from mtrl.balancers.registry import hparam_defaults

__all__ = ["check_balancer"]


def _factory(obj: Any) -> tuple[Callable[[], Balancer], str]:
    if isinstance(obj, str):
        from mtrl.balancers import build

        build(obj)  # fail early with the registry's message
        return (lambda: build(obj)), obj
    if isinstance(obj, Balancer):
        template = copy.deepcopy(obj)
        return (lambda: copy.deepcopy(template)), obj.name or type(obj).__name__
    if callable(obj):
        return obj, getattr(obj, "name", "") or getattr(obj, "__name__", repr(obj))
    raise TypeError(
        "check_balancer expects a Balancer instance, a zero-argument factory (e.g. the "
        f"class) or a registered name, got {obj!r}"
    )


def _fail(label: str, what: str) -> AssertionError:
    return AssertionError(f"check_balancer[{label}]: {what}")


def _close(a: Tensor, b: Tensor, rtol: float, scale: float) -> bool:
    return bool(torch.allclose(a, b, rtol=rtol, atol=rtol * max(scale, 1e-30)))


def _plumbing_direction(b: Balancer, grads: Tensor, losses: Tensor) -> Tensor:
    """The direction :mod:`mtrl.grad` would write, from the (K, D) ``grads``."""
    k = grads.shape[0]
    idx = b.select(k)
    if idx is not None:
        ok = (isinstance(idx, Tensor) and idx.ndim == 1 and idx.numel() > 0
              and not idx.is_floating_point() and int(idx.min()) >= 0
              and int(idx.max()) < k and torch.unique(idx).numel() == idx.numel())
        if not ok:
            raise AssertionError(
                f"select({k}) must return None or a non-empty 1-D integer tensor of distinct "
                f"task indices in [0, {k}), got {idx!r}"
            )
        idx = idx.to(grads.device)
        grads, losses = grads.index_select(0, idx), losses.index_select(0, idx)
    if not b.needs_grads:
        w = b.weights_for(None, losses)
    elif weights_from_gramian(b):
        g64 = grads.detach().to("cpu", torch.float64)
        w = b.weights_for(None, losses, gram=g64 @ g64.T, grads_dtype=grads.dtype)
    else:
        # the plumbing hands combine_rows the rows it logs statistics from (not a copy, as
        # combine's index_select makes for a sampler): they must come back unchanged
        before, losses_before = grads.clone(), losses.clone()
        out = b.combine_rows(grads, losses)
        if not (torch.equal(before, grads) and torch.equal(losses_before, losses)):
            raise AssertionError(
                "combine_rows modified its input gradients or losses in place (the training "
                "plumbing computes the logged gradient statistics from those rows)"
            )
        return out
    return w.to(device=grads.device, dtype=grads.dtype) @ grads


def check_balancer(
    balancer_or_factory: Any,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> None:
    """Check the balancer contract and its declared properties; raise ``AssertionError``.

    ``balancer_or_factory``: a :class:`~mtrl.balancers.Balancer` instance, a zero-argument
    callable returning a fresh one (e.g. the class), or a registered name. ``seed`` seeds
    the random test matrices; ``device`` is where they live.
    """
    make, label = _factory(balancer_or_factory)
    gen = torch.Generator().manual_seed(seed)

    def fresh() -> Balancer:
        b = make()
        if not isinstance(b, Balancer):
            raise _fail(label, f"factory returned {type(b).__name__}, not a Balancer")
        return b

    proto = fresh()
    label = proto.name or label

    def rand(*shape: int, dtype: torch.dtype = torch.float64) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device, dtype)

    def losses_for(k: int, dtype: torch.dtype = torch.float64) -> Tensor:
        x = 0.5 + torch.rand(k, generator=gen, dtype=torch.float64)
        return x.to(device, dtype)

    def run(b: Balancer, grads: Tensor, losses: Tensor, what: str) -> Tensor:
        before, losses_before = grads.clone(), losses.clone()
        try:
            out = b.combine(grads, losses)
        except Exception as exc:  # report which property crashed
            raise _fail(label, f"{what}: combine raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(out, Tensor):
            raise _fail(label, f"{what}: combine returned {type(out).__name__}, not a Tensor")
        if out.shape != (grads.shape[1],):
            raise _fail(label, f"{what}: output shape {tuple(out.shape)} != ({grads.shape[1]},)")
        if out.dtype != grads.dtype or out.device != grads.device:
            raise _fail(
                label,
                f"{what}: output {out.dtype}/{out.device} != input {grads.dtype}/{grads.device}",
            )
        if not bool(torch.isfinite(out).all()):
            raise _fail(label, f"{what}: output is not finite: {out}")
        if not torch.equal(before, grads):
            raise _fail(label, f"{what}: combine modified its input gradients in place")
        if not torch.equal(losses_before, losses):
            raise _fail(label, f"{what}: combine modified its input losses in place")
        return out

    # 1. shape / dtype / device / finiteness, float32 and float64
    k, d = 4, 12
    base = rand(k, d) + 0.3
    losses = losses_for(k)
    for dtype in (torch.float32, torch.float64):
        run(fresh(), base.to(dtype), losses.to(dtype), f"random {k}x{d} {dtype}")

    # 1b. determinism: two copies of one instance give the same output on the same input
    # (random state kept in the global generator would make every later check fail with
    # a message about another property)
    b0 = fresh()
    out_a = run(copy.deepcopy(b0), base, losses, "first copy")
    out_b = run(copy.deepcopy(b0), base, losses, "second copy")
    if not torch.equal(out_a, out_b):
        raise _fail(
            label,
            f"two copies of one instance gave different outputs on the same input ({out_a} vs "
            f"{out_b}): keep random state in the balancer (a torch.Generator whose state is "
            "a buffer), not in torch's global generator",
        )

    def consensus(grads: Tensor, row: Tensor, what: str) -> None:
        out = run(fresh(), grads, losses_for(grads.shape[0]), what)
        scale = float(row.norm())
        if getattr(proto, "consensus_exact", True):
            if not _close(out, row, 1e-6, scale):
                raise _fail(label, f"{what}: expected that row {row}, got {out}")
        else:
            coef = float(out @ row) / scale**2
            if not (coef > 0 and _close(out, coef * row, 1e-6, scale * max(coef, 1.0))):
                raise _fail(label, f"{what}: expected a positive multiple of {row}, got {out}")

    # 2. one task returns (a positive multiple of) its gradient
    g1 = rand(1, d)
    consensus(g1, g1[0], "K=1")
    # 3. identical rows
    row = rand(d)
    consensus(row.expand(3, d).clone(), row, "3 identical rows")

    # 4. a zero row: finite output
    zrow = rand(4, d) + 0.3
    zrow[2] = 0.0
    run(fresh(), zrow, losses_for(4), "one zero gradient row")
    # all rows zero: finite output
    run(fresh(), torch.zeros(3, d, dtype=torch.float64, device=device), losses_for(3), "all-zero")

    # 5. more tasks than parameters
    run(fresh(), rand(7, 3), losses_for(7), "K=7 > D=3")
    run(fresh(), rand(7, 3) + 1.0, losses_for(7), "K=7 > D=3 (aligned)")

    # 6. permutation equivariance
    if getattr(proto, "permutation_equivariant", True):
        out = run(fresh(), base, losses, "unpermuted")
        # a shift moves every task; a random draw may leave some (or all) in place
        for perm in (torch.roll(torch.arange(k), 1), torch.randperm(k, generator=gen)):
            perm = perm.to(device)
            outp = run(fresh(), base[perm], losses[perm], f"permuted {perm.tolist()}")
            if not _close(out, outp, 1e-6, float(out.norm())):
                raise _fail(
                    label,
                    f"permuting the tasks by {perm.tolist()} changed the output ({out} vs "
                    f"{outp}); set permutation_equivariant = False if that is intended",
                )

    # 7. positive scaling
    degree = getattr(proto, "scale_degree", 1.0)
    if degree is not None:
        b0 = fresh()
        out = run(copy.deepcopy(b0), base, losses, "unscaled")
        for s in (0.01, 7.0):
            outs = run(copy.deepcopy(b0), base * s, losses, f"grads scaled by {s}")
            want = out * s**degree
            if not _close(outs, want, 1e-5, float(want.norm())):
                raise _fail(
                    label,
                    f"scaling the gradients by {s} should scale the output by s**{degree}: "
                    f"got {outs}, expected {want} (declare scale_degree = None if there is "
                    "no such law)",
                )

    # 7b. a balancer that declares it never reads the loss values must not depend on them
    # (``weights`` itself is called: ``combine`` hands such a balancer zeros anyway; one
    # with its own ``combine_rows`` / ``weights_for`` gets the losses from the plumbing)
    if not getattr(proto, "reads_losses", True):
        b1 = fresh()  # copies of one instance: the same random state (PCGrad's order)
        if weights_from_gramian(proto) or not proto.needs_grads:
            g64 = base.detach().to("cpu", torch.float64)
            gram = g64 @ g64.T
            l64 = losses.detach().to("cpu", torch.float64)
            w = copy.deepcopy(b1).weights(gram, l64)
            w_other = copy.deepcopy(b1).weights(gram, l64 * 3.0 + 1.0)
            what = "weights"
        else:
            w = copy.deepcopy(b1).combine_rows(base, losses)
            w_other = copy.deepcopy(b1).combine_rows(base, losses * 3.0 + 1.0)
            what = "direction (combine_rows)"
        if not torch.equal(w, w_other):
            raise _fail(
                label,
                f"reads_losses = False, but other loss values changed the {what} ({w} vs "
                f"{w_other})",
            )

    # 8. NaN / Inf input (gradients or losses) raises ValueError
    for where in ("grads", "losses"):
        for bad in (float("nan"), float("inf")):
            g, bad_losses = base.clone(), losses.clone()
            if where == "grads":
                g[1, 3] = bad
            else:
                bad_losses[2] = bad
            try:
                fresh().combine(g, bad_losses)
            except ValueError:
                pass
            except Exception as exc:
                raise _fail(
                    label, f"{bad} in {where} raised {type(exc).__name__}, not ValueError"
                ) from exc
            else:
                raise _fail(label, f"{bad} in {where} did not raise ValueError")

    # 9. state_dict round trip: a fresh instance loaded with the state after three calls
    # continues identically for three more (state kept outside buffers would not)
    steps = [base + 0.1 * i * rand(k, d) for i in range(6)]

    def call(b: Balancer, i: int, what: str) -> Tensor:
        out = run(b, steps[i], losses * (1.0 - 0.05 * i), what)
        if getattr(b, "needs_losses_after_step", False):
            b.after_step(losses * (0.95 - 0.05 * i))
        return out

    b1 = fresh()
    for i in range(3):
        call(b1, i, f"call {i + 1}")
    b2 = fresh()
    try:
        b2.load_state_dict(b1.state_dict())
    except Exception as exc:
        raise _fail(
            label, f"load_state_dict of a used instance failed: {type(exc).__name__}: {exc}"
        ) from exc
    for i in range(3, 6):
        out1 = call(b1, i, f"call {i + 1}")
        out2 = call(b2, i, f"call {i + 1} after load_state_dict")
        if not _close(out1, out2, 1e-9, float(out1.norm())):
            raise _fail(label, f"state_dict did not capture the state (call {i + 1}): "
                        f"{out1} vs {out2}")

    # 9b. losses are optional: combine(grads) works, or raises a ValueError (a method that
    # needs the losses says so; the base class does for loss-only methods that read them)
    try:
        out = fresh().combine(base)
    except ValueError:
        pass
    except Exception as exc:
        raise _fail(
            label,
            f"combine(grads) without losses raised {type(exc).__name__}: {exc}; return a "
            "direction, or raise ValueError saying that the losses are needed",
        ) from exc
    else:
        if not isinstance(out, Tensor):
            got = type(out).__name__
        else:
            finite = bool(torch.isfinite(out).all())
            got = (f"a {'' if finite else 'non-finite '}{tuple(out.shape)} {out.dtype} "
                   f"tensor on {out.device}")
        if got != f"a {(d,)} {base.dtype} tensor on {base.device}":
            raise _fail(label, f"combine(grads) without losses returned {got} (expected a "
                        f"finite ({d},) {base.dtype} tensor on {base.device})")

    # 9c. the training plumbing (mtrl.grad) calls select(), then weights_for(gram=...)
    # (or, for methods with their own combine_rows / weights_for, combine_rows) on the
    # selected rows only: it must give combine's direction
    b_ref = fresh()
    b_plumb = copy.deepcopy(b_ref)  # the same state (a seed drawn at construction, say)
    ref = run(b_ref, base, losses, "combine (plumbing reference)")
    try:
        out = _plumbing_direction(b_plumb, base, losses)
    except AssertionError as exc:
        raise _fail(label, str(exc)) from exc
    except Exception as exc:
        raise _fail(
            label,
            f"the training plumbing (select, then weights_for(gram=...) or combine_rows) "
            f"raised {type(exc).__name__}: {exc}; implement weights() (or combine_rows())",
        ) from exc
    if not _close(out, ref, 1e-9, float(ref.norm())):
        raise _fail(label, f"the training plumbing gives {out}, combine gives {ref}")

    # 10. hyper-parameters are visible in repr: every argument ``build`` accepts is kept
    # as an attribute of the same name (repr reads it)
    text = repr(proto)
    for key in hparam_defaults(type(proto)):
        if not hasattr(proto, key):
            raise _fail(label, f"hyper-parameter {key!r} is not kept as the attribute "
                        f"self.{key}, so repr cannot show it")
        if not re.search(rf"(?<![\w.]){re.escape(key)}=", text):  # (not rho_c= for c)
            raise _fail(label, f"repr {text!r} does not show hyper-parameter {key!r}")
