"""Private helpers shared by the built-in balancers.

* hyper-parameter validation with messages naming the parameter and its valid range;
* buffer and random-generator helpers (state that must survive ``state_dict()``);
* small float64 solvers on the K×K Gramian, all solved to convergence:

  - :func:`simplex_qp`: ``argmin_{w ∈ Δ} ½ wᵀAw + bᵀw`` (quadprog, then an exact
    active-set polish);
  - :func:`nonneg_qp`: ``argmin_{x ≥ 0} ½ xᵀAx + cᵀx`` (block principal pivoting from a
    guessed active set, quadprog as the fallback), used by :func:`dual_cone_weights`
    (projection onto the cone ``{d : Gd ≥ 0}``);
  - :func:`power_fixed_point` / :func:`power_weights`: the positive solution of
    ``A w = w^(-p)`` by damped Newton on a strictly convex potential (FairGrad, Nash-MTL).

Float32 Gramians can be slightly indefinite; :func:`nearest_psd` clips their negative
eigenvalues (rounding level) when quadprog refuses them.

Everything here works on NumPy float64 arrays; callers convert from/to torch.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np
import quadprog
import torch
from torch import Tensor, nn

#: Relative ridge added to a normalised Gramian (unit largest diagonal for simplex QPs,
#: unit trace for dual-cone projections) so quadprog's Cholesky succeeds on positive
#: semi-definite inputs; simplex-QP solutions are then polished without it.
RIDGE = 1e-12

#: :func:`power_weights` counts 0 as in the convex hull of the gradients when the squared
#: min-norm point of the unit gradients is at most ``max(HULL_FLOOR, 10·eps)`` (``eps``:
#: the Gramian's precision). For float64 Gramians this is ~45 rounding units: two unit
#: gradients at an angle π − δ have ``δ²/4`` there, so opposite gradients count as
#: opposite only below δ ≈ 2e-7 (the earlier floor, 1e-10, sent δ up to 2e-5 to the
#: mean-weight fallback although a positive solution exists and Newton finds it).
HULL_FLOOR = 1e-14

# --------------------------------------------------------------------------- validation


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    low_open: bool = False,
    integer: bool = False,
    high: float | None = None,
) -> Any:
    """Validate a numeric hyper-parameter and return it (``int`` or ``float``).

    Raises ``ValueError`` naming ``name`` and the valid range for non-numeric, NaN/Inf
    (or too large for a float), non-integral (when ``integer``) or out-of-range values.
    """
    kind = "an integer" if integer else "a finite number"
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        bounds.append(f"<= {high:g}" if high < 1e15 else f"<= {int(high)}")
    rng = (" " + " and ".join(bounds)) if bounds else ""
    msg = f"{name} must be {kind}{rng}, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(msg)
    try:
        if integer:
            if isinstance(value, numbers.Integral):
                value = int(value)
            elif float(value).is_integer():
                value = int(value)
            else:
                raise ValueError(msg)
        else:
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(msg)
    except OverflowError as exc:  # e.g. 10**400 as a float
        raise ValueError(msg) from exc
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(msg)
    if high is not None and value > high:
        raise ValueError(msg)
    return value


def check_seed(seed: Any) -> int | None:
    """``None`` or an integer in ``[0, 2**64 - 1]`` (what ``torch.Generator`` takes)."""
    if seed is None:
        return None
    return check_number("seed", seed, low=0, integer=True, high=2**64 - 1)


# --------------------------------------------------------------------------- buffers


def set_buffer(module: nn.Module, name: str, value: Tensor) -> None:
    """Replace buffer ``name`` (any shape) keeping the buffer's current device and dtype."""
    old = getattr(module, name)
    setattr(module, name, value.detach().to(device=old.device, dtype=old.dtype).clone())


def get_buffer64(module: nn.Module, name: str) -> Tensor:
    """Buffer ``name`` as a float64 CPU tensor (a copy)."""
    return getattr(module, name).detach().to("cpu", torch.float64).clone()


def initial_rng_state(seed: int | None) -> Tensor:
    """State of a CPU ``torch.Generator`` seeded with ``seed``.

    ``seed=None`` draws the seed from torch's global generator, so ``torch.manual_seed``
    makes runs reproducible.
    """
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen.get_state()


def with_generator(module: nn.Module, fn: Callable[[torch.Generator], Any]) -> Any:
    """Run ``fn(gen)`` with the generator stored in ``module.rng_state``, then save it back."""
    gen = torch.Generator()
    gen.set_state(module.rng_state.detach().to("cpu", torch.uint8).contiguous())
    out = fn(gen)
    set_buffer(module, "rng_state", gen.get_state())
    return out


# --------------------------------------------------------------------------- QPs

def _sym(a: np.ndarray) -> np.ndarray:
    return 0.5 * (a + a.T)


def nearest_psd(a: np.ndarray) -> np.ndarray:
    """The nearest positive semi-definite matrix (Frobenius norm) to symmetric ``a``.

    A Gramian formed in float32 can have eigenvalues of about ``-1e-7 × trace``; clipping
    them to 0 changes it only at rounding level and lets quadprog factor it.
    """
    lam, vec = np.linalg.eigh(_sym(a))
    return _sym((vec * np.clip(lam, 0.0, None)) @ vec.T)


def _quadprog_psd(a: np.ndarray, lin: np.ndarray, c: np.ndarray, rhs: np.ndarray, meq: int):
    """quadprog on ``a + RIDGE·I``; if that is not numerically positive definite (a float32
    Gramian), on the nearest PSD matrix plus the ridge. Returns ``(x, matrix used)``."""
    k = a.shape[0]
    try:
        return quadprog.solve_qp(a + RIDGE * np.eye(k), lin, c, rhs, meq)[0], a
    except ValueError:
        a = nearest_psd(a)
        ridge = max(RIDGE, 1e-14 * k)
        return quadprog.solve_qp(a + ridge * np.eye(k), lin, c, rhs, meq)[0], a


def simplex_kkt_residual(
    a: np.ndarray, b: np.ndarray, w: np.ndarray, c: np.ndarray | None = None
) -> float:
    """KKT violation of ``w`` for ``min ½wᵀAw + bᵀw`` s.t. ``w ≥ 0``, ``cᵀw = 1``
    (``c = 1``: the simplex), in the scale of ``a`` and ``b``."""
    if c is None:
        c = np.ones_like(w)
    if not (np.all(np.isfinite(w)) and np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return math.inf  # (max(0.0, nan) would read as converged)
    grad = a @ w + b
    mu = float(w @ grad)  # the multiplier of cᵀw = 1 (Σ w_i (grad_i − μ c_i) = 0)
    dual = max(0.0, float(np.max(mu * c - grad)))  # grad_i >= mu c_i for all i
    comp = float(np.max(w * np.abs(grad - mu * c)))  # equality where w_i > 0
    primal = max(0.0, float(-w.min())) + abs(float(c @ w) - 1.0)
    return max(dual, comp, primal)


def _solve_on_support(
    a: np.ndarray, b: np.ndarray, support: np.ndarray, c: np.ndarray | None = None
) -> np.ndarray | None:
    """KKT solution of ``min ½wᵀAw + bᵀw``, ``w ≥ 0``, ``cᵀw = 1`` with the given support
    (inactive entries = 0; ``c = 1`` by default); None if infeasible there."""
    if c is None:
        c = np.ones(a.shape[0])
    idx = np.flatnonzero(support)
    m = idx.size
    if m == 0:
        return None
    mat = np.zeros((m + 1, m + 1))
    mat[:m, :m] = a[np.ix_(idx, idx)]
    mat[:m, m] = c[idx]
    mat[m, :m] = c[idx]
    rhs = np.empty(m + 1)
    rhs[:m] = -b[idx]
    rhs[m] = 1.0
    try:
        sol = np.linalg.solve(mat, rhs)
    except np.linalg.LinAlgError:
        sol = np.linalg.lstsq(mat, rhs, rcond=None)[0]
    if not np.all(np.isfinite(sol)) or sol[:m].min() < -1e-12:
        return None
    w = np.zeros(a.shape[0])
    w[idx] = np.clip(sol[:m], 0.0, None)
    s = float(c @ w)
    if s <= 0:
        return None
    return w / s


def _jacobi(a: np.ndarray) -> np.ndarray:
    """``s_i = sqrt(A_ii)`` (``sqrt(max A_ii)`` for rows below ``1e-30 ×`` the largest:
    zero gradients), so that ``A / (s sᵀ)`` has a unit diagonal."""
    d = np.diag(a)
    dmax = float(d.max())
    return np.sqrt(np.where(d > 1e-30 * dmax, d, dmax))


def simplex_qp(
    a: np.ndarray, b: np.ndarray | None = None, *, guess: np.ndarray | None = None
) -> np.ndarray:
    """``argmin_{w ∈ Δ} ½ wᵀAw + bᵀw`` for a PSD ``A`` (K×K), solved to machine precision.

    Solved in Jacobi-scaled variables ``w = c ⊙ z`` (``c_i ∝ 1/sqrt(A_ii)``, so the
    matrix in ``z`` has a unit diagonal and ``Σ c_i z_i = 1``; norms below ``1e-8`` of the
    largest are scaled as if they were that large): gradients of very different norms
    (measured: ratios of 1e3 and more) are then treated alike by the ridge and the
    tolerances, which a scale common to all rows cannot do. quadprog solves it with a
    relative ridge of :data:`RIDGE` (it needs a positive-definite matrix); the result is
    polished by solving the KKT system on the active set of the unridged problem, kept
    when it is feasible and has a smaller KKT residual. If that solve fails or does not
    converge (quadprog on a badly scaled linear term, e.g. norms 1e-3 and 1e-12 of the
    largest with ``b ≠ 0``), the problem is solved again in the common scale (largest
    diagonal 1). ``guess`` (weights from a previous call) is tried first: if the KKT
    system on its support solves the problem, quadprog is skipped.
    """
    k = a.shape[0]
    if b is None:
        b = np.zeros(k)
    if k == 1:
        return np.ones(1)
    a = _sym(a)
    dmax = float(np.max(np.diag(a)))
    if not dmax > 0.0:  # all gradients zero: the objective is linear
        bmin = b.min()
        w = (b <= bmin + 1e-15 * max(1.0, abs(bmin))).astype(np.float64)
        return w / w.sum()
    jacobi = np.maximum(_jacobi(a), 1e-8 * math.sqrt(dmax))
    w, converged = _simplex_solve(a, b, guess, jacobi)
    if converged:
        return w
    w2, _ = _simplex_solve(a, b, guess, np.full(k, math.sqrt(dmax)), strict=False)
    if w is not None:  # keep the better of the two (objective in the original scale)
        f1, f2 = (0.5 * float(x @ a @ x) + float(b @ x) for x in (w, w2))
        if f1 < f2:
            return w
    return w2


def _simplex_solve(
    a: np.ndarray, b: np.ndarray, guess: np.ndarray | None, s: np.ndarray, strict: bool = True
) -> tuple[np.ndarray | None, bool]:
    """:func:`simplex_qp` in the variables ``w = c ⊙ z``, ``c = min(s)/s``: ``(w,
    converged)``, converged meaning a KKT residual within 1e3 × the tolerance. With
    ``strict`` a failed solve gives ``(None, False)``; without, quadprog's error is raised
    (and a non-converged ``w`` is returned as it is)."""
    k = a.shape[0]
    c = s.min() / s  # in (0, 1]
    a_z = a / np.outer(s, s)  # = cm² · diag(c) A diag(c), cm = 1 / min(s)
    b_z = b / (s * s.min())  # = cm² · c ⊙ b
    tol = 1e-13 * (1.0 + float(np.abs(b_z).max()))

    def weights(z: np.ndarray) -> np.ndarray:
        w = np.clip(c * z, 0.0, None)
        return w / w.sum()

    if guess is not None and guess.shape == (k,):
        z = _solve_on_support(a_z, b_z, guess > 1e-12, c)
        if z is not None and simplex_kkt_residual(a_z, b_z, z, c) <= tol:
            return weights(z), True

    constraints = np.hstack([c[:, None], np.eye(k)])
    rhs = np.zeros(k + 1)
    rhs[0] = 1.0
    try:
        z, a_z = _quadprog_psd(a_z, -b_z, constraints, rhs, 1)
    except ValueError:
        if strict:
            return None, False
        raise
    z = np.clip(z, 0.0, None)
    total = float(c @ z)
    if not (math.isfinite(total) and total > 0.0):  # quadprog gave no usable point
        if strict:
            return None, False
        z = np.ones(k)  # start the polish from uniform weights
        total = float(c @ z)
    z = z / total
    res = simplex_kkt_residual(a_z, b_z, z, c)
    if res > tol:
        polished = _solve_on_support(a_z, b_z, z > 1e-10 * z.max(), c)
        if polished is not None:
            pres = simplex_kkt_residual(a_z, b_z, polished, c)
            if pres < res:
                z, res = polished, pres
    w = weights(z)
    converged = bool(res <= 1e3 * tol) and bool(np.all(np.isfinite(w)))
    if strict and not np.all(np.isfinite(w)):
        return None, False
    return w, converged


def _nnqp_pivoting(
    a: np.ndarray, c: np.ndarray, free: np.ndarray, max_iter: int = 25
) -> np.ndarray | None:
    """Block principal pivoting (Júdice & Pires; Kim & Park's safeguard) for
    ``min_{x ≥ 0} ½xᵀAx + cᵀx``, ``A`` positive definite, from the guessed free set."""
    k = a.shape[0]
    free = free.copy()
    tol = 1e-13 * (float(np.abs(c).max()) + 1e-300)
    best, backup = k + 1, 3
    for _ in range(max_iter):
        x = np.zeros(k)
        idx = np.flatnonzero(free)
        if idx.size:
            try:
                x[idx] = np.linalg.solve(a[np.ix_(idx, idx)], -c[idx])
            except np.linalg.LinAlgError:
                return None
        grad = a @ x + c
        bad = (free & (x < 0.0)) | (~free & (grad < -tol))
        n_bad = int(bad.sum())
        if n_bad == 0:
            return np.clip(x, 0.0, None)
        if n_bad < best:
            best, backup = n_bad, 3
            free ^= bad
        elif backup > 0:
            backup -= 1
            free ^= bad
        else:  # single pivot on the largest infeasible index (finite termination)
            j = int(np.flatnonzero(bad)[-1])
            free[j] = not free[j]
    return None


def nonneg_qp(a: np.ndarray, c: np.ndarray, *, guess: np.ndarray | None = None) -> np.ndarray:
    """``argmin_{x ≥ 0} ½ xᵀ(A + ridge·I)x + cᵀx`` for a PSD ``A`` (ridge :data:`RIDGE`).

    With ``guess`` (a boolean mask of entries expected to be positive) the problem is
    first solved by block principal pivoting started from that set, which needs only a
    few small linear solves when the guess is close; quadprog is the fallback (and the
    solver when no guess is given). Both return the exact optimum of the ridged problem.
    """
    k = a.shape[0]
    if guess is not None:
        x = _nnqp_pivoting(a + RIDGE * np.eye(k), c, guess)
        if x is not None:
            return x
    x, _ = _quadprog_psd(a, -c, np.eye(k), np.zeros(k), 0)
    return np.clip(x, 0.0, None)


def dual_cone_weights(a: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Weights ``v`` with ``Gᵀv`` the projection of ``Gᵀu`` onto the cone ``{d : Gd ≥ 0}``.

    ``u`` is one weight vector (K,) or a stack of them (M, K); the result has its shape.
    By duality (Quinton & Rey 2024, Prop. 1) ``v = argmin_{v ≥ u} vᵀAv``; written as
    ``v = u + x`` it is ``x = argmin_{x ≥ 0} ½xᵀAx + (Au)ᵀx``. That problem is unchanged
    by diagonal scaling (``x = y / s``), so it is solved on the unit-diagonal ``A/(s sᵀ)``,
    ``s_i = sqrt(A_ii)``, with a relative ridge :data:`RIDGE`: gradients of very
    different norms are then treated alike (a common scale lets the ridge swamp the small
    rows); the ridge's own bias is then removed on the solution's support where the
    matrix allows (:func:`_unridged_nonneg_qp`). No QP when ``Au ≥ 0`` (already in the
    cone), else block pivoting from the set ``{(Au)_j < 0}``, else quadprog.
    """
    single = u.ndim == 1
    us = np.atleast_2d(u)
    out = us.copy()
    k = a.shape[0]
    if k == 1 or not float(np.max(np.diag(a))) > 0.0:
        return out[0] if single else out
    a = _sym(a)
    s = _jacobi(a)
    a_s = a / np.outer(s, s)
    lins = (us @ a) / s
    if lins.min() < 0.0:
        try:  # quadprog / pivoting need a numerically PD matrix (float32 Gramians may not be)
            np.linalg.cholesky(a_s + RIDGE * np.eye(k))
        except np.linalg.LinAlgError:
            a_s = nearest_psd(a_s)
            lins = (us * s) @ a_s  # (A u) / s with the corrected matrix
        try:  # without the ridge: then its bias can be removed (_unridged_nonneg_qp)
            np.linalg.cholesky(a_s)
            positive_definite = True
        except np.linalg.LinAlgError:
            positive_definite = False
        for i, lin in enumerate(lins):
            if lin.min() < 0.0:
                out[i] += _unridged_nonneg_qp(a_s, lin, positive_definite) / s
    return out[0] if single else out


def _unridged_nonneg_qp(a: np.ndarray, c: np.ndarray, positive_definite: bool) -> np.ndarray:
    """``argmin_{x ≥ 0} ½ xᵀAx + cᵀx`` without the ridge's bias where that is safe.

    The solvers need ``A + ridge·I``, whose solution is off by ~ridge/λ_min relative, and
    λ_min is ~1e-10 for two nearly opposite gradients (UPGrad's direction was 4e-4 off at
    a 1e-4 mismatch). So the ridged solution ``x`` is re-solved without the ridge:

    * ``A`` numerically positive definite (Cholesky, checked by the caller): block
      principal pivoting on ``A`` started from ``x``'s support (the ridge can move the
      support), kept if it converges (it checks the KKT conditions) and grows < 1000×;
    * otherwise (a duplicated task, K > D), or if that fails: ``A_FF x_F = −c_F`` on
      ``x``'s support ``F`` alone, kept if ``A_FF`` passes Cholesky and the result
      satisfies the unridged KKT conditions without growing more than 10×.

    Else the ridged ``x`` stays (a slightly indefinite float32 Gramian: removing the ridge
    there amplified rounding, weights ~1e96, in an earlier version).
    """
    x = nonneg_qp(a, c, guess=c < 0.0)
    if not np.any(x > 0.0):
        return x
    xmax = float(np.abs(x).max())
    if positive_definite:
        y = _nnqp_pivoting(a, c, x > 0.0)
        if y is not None and np.all(np.isfinite(y)) and float(np.abs(y).max()) <= 1e3 * xmax:
            return y
    idx = np.flatnonzero(x > 0.0)
    try:
        chol = np.linalg.cholesky(a[np.ix_(idx, idx)])
    except np.linalg.LinAlgError:
        return x
    xf = np.linalg.solve(chol.T, np.linalg.solve(chol, -c[idx]))
    if not np.all(np.isfinite(xf)) or xf.min() < 0.0 or float(np.abs(xf).max()) > 10 * xmax:
        return x
    y = np.zeros_like(x)
    y[idx] = xf
    off = np.ones(x.shape[0], dtype=bool)
    off[idx] = False
    tol = 1e-12 * (float(np.abs(c).max()) + float(np.abs(a).max()) * float(np.abs(y).max()))
    if off.any() and float((a @ y + c)[off].min()) < -tol:
        return x
    return y


def min_norm_sq(a: np.ndarray) -> float:
    """``min_{w∈Δ} wᵀAw`` relative to the largest diagonal entry (0 = 0 in the hull)."""
    scale = float(np.max(np.diag(a)))
    if not scale > 0.0:
        return 0.0
    w = simplex_qp(a)
    return float(w @ a @ w) / scale


# --------------------------------------------------------------------------- fixed points


def _potential(a: np.ndarray, w: np.ndarray, p: float) -> float:
    if p == 1.0:
        h = np.log(w).sum()
    else:
        h = (w ** (1.0 - p)).sum() / (1.0 - p)
    return 0.5 * float(w @ a @ w) - float(h)


def power_residual(a: np.ndarray, w: np.ndarray, p: float) -> float:
    """Relative residual ``max_i |(Aw)_i · w_i^p − 1|`` of ``A w = w^(-p)``."""
    return float(np.max(np.abs((a @ w) * w**p - 1.0)))


def power_rounding_floor(
    a: np.ndarray, w: np.ndarray, eps: float = 2.0**-52, p: float = 0.0
) -> float:
    """Rounding floor of :func:`power_residual` at ``w``: ``ε (max_i (|A||w|)_i /
    |(Aw)_i| + p)``, the relative error of ``(Aw)_i`` when its terms cancel, for entries
    of ``A`` (or float64 arithmetic) with relative precision ``ε``, plus that of
    ``w_i^p`` when ``w_i`` is exact to ``ε`` (``p ε``: FairGrad with ``α = 1e-8`` has
    ``p = 1e8``, a floor of ~2e-8 however exact ``w`` is)."""
    aw = np.abs(a @ w)
    if not np.all(aw > 0.0):
        return math.inf
    return float(eps * (np.max((np.abs(a) @ np.abs(w)) / aw) + p))


def power_fixed_point(
    a: np.ndarray,
    p: float,
    *,
    w0: np.ndarray | None = None,
    tol: float = 1e-12,
    accept_tol: float = 1e-9,
    max_iter: int = 200,
) -> tuple[np.ndarray | None, int, float, np.ndarray | None]:
    """Positive solution of ``A w = w^(-p)`` (``p > 0``), or ``None`` if there is none.

    It is the unique minimiser of the strictly convex potential
    ``½ wᵀAw − Σ h(w_i)`` with ``h'(w) = w^(-p)`` on ``w > 0``, found by Newton's method
    with a fraction-to-the-boundary rule and Armijo backtracking (near the root, where the
    potential's decrease is below its rounding, a step that halves the residual is taken
    instead), from ``w0`` (a warm
    start) or from the best uniform vector. The solve runs on ``A`` scaled to unit mean
    diagonal and the solution is scaled back (``w ∝ s^(-1/(1+p))``). A minimiser exists
    iff 0 is not in the convex hull of the gradients; otherwise the iterates diverge and
    ``None`` is returned. Iterations stop at relative residual ``tol``, or when the
    residual stagnates (8 iterations without halving) below ``accept_tol`` (round-off
    floor of an ill-conditioned Gramian). Returns ``(w or None, iterations, relative
    residual, last iterate)``; the last iterate (unscaled) can warm-start a longer run.
    """
    k = a.shape[0]
    scale = float(np.mean(np.diag(a)))
    if not scale > 0.0:
        return None, 0, math.inf, None
    a_s = _sym(a) / scale
    expo = 1.0 / (1.0 + p)
    if w0 is not None and w0.shape == (k,) and np.all(w0 > 0) and np.all(np.isfinite(w0)):
        w = w0 * scale**expo
    else:
        row = float(a_s.sum()) / k
        t = row ** (-expo) if row > 1e-12 else 1.0
        w = np.full(k, t)
    eye = np.eye(k)
    res = math.inf
    best_w, best_res, best_it = w, math.inf, 0
    for it in range(max_iter + 1):
        wp = w ** (-p)
        aw = a_s @ w
        res = float(np.max(np.abs(aw / wp - 1.0)))
        if res <= tol:
            return w * scale ** (-expo), it, res, None
        if res < 0.5 * best_res:
            best_w, best_res, best_it = w, res, it
        if it - best_it >= 8 and best_res <= accept_tol:
            # stagnating at round-off level of an ill-conditioned Gramian: converged
            return best_w * scale ** (-expo), it, best_res, None
        if it == max_iter or w.max() > 1e15 or not np.all(np.isfinite(w)):
            break
        grad = aw - wp
        hess = a_s + eye * (p * wp / w)
        try:
            step = -np.linalg.solve(hess, grad)
        except np.linalg.LinAlgError:
            break
        neg = step < 0
        t = 1.0
        if np.any(neg):
            t = min(1.0, 0.995 * float(np.min(-w[neg] / step[neg])))
        f0 = _potential(a_s, w, p)
        slope = float(grad @ step)
        if slope > 0:  # cannot happen for a PD Hessian; guard against round-off
            break
        for _ in range(60):
            f1 = _potential(a_s, w + t * step, p)
            if f1 <= f0 + 1e-4 * t * slope + 1e-15 * abs(f0):
                break
            # Close to the root the potential's decrease falls below the float64 rounding
            # of its terms, and Armijo rejects good Newton steps (Newton stalled at residual
            # ~1e-8 and the caller fell back to mean weights): there, accept a step that
            # halves the residual (Newton's quadratic phase) instead.
            if res < 1e-2 and power_residual(a_s, w + t * step, p) <= 0.5 * res:
                break
            t *= 0.5
        w = w + t * step
    return None, it, res, w * scale ** (-expo)


def power_weights(
    a: np.ndarray, p: float, w0: np.ndarray | None = None, eps: float = 2.0**-52
) -> tuple[np.ndarray, dict[str, Any]]:
    """Weights solving ``A w = w^(-p)`` with the documented degenerate-case fallbacks.

    ``eps``: relative precision of ``A``'s entries (float32 Gramians: 2**-23). 0 counts
    as in the hull when the min-norm point of the unit gradients is within rounding,
    ``|Σ w_i u_i|² ≤ max(HULL_FLOOR, 10·eps)``: a float32 Gramian of two opposite gradients
    looks slightly non-degenerate, and its "root" (weights ~1e4) is rounding noise. For
    such low-precision Gramians the test also runs when Newton's root does not certify
    ``(Aw)_i > 0`` beyond 10× rounding; in float64 only when Newton fails.

    * Zero gradient rows (diagonal entry ≤ 1e-20 × the largest) get weight 0 and the
      equation is solved on the other rows (``info["fallback"]`` says so).
    * If no positive solution exists on those rows (0 is in the convex hull of the
      gradients, e.g. two opposite gradients, or K > D with such a configuration), the
      mean weights ``1/K`` are returned and ``info["fallback"]`` says why.
    * All rows zero: mean weights (the direction is 0 anyway).
    """
    k = a.shape[0]
    info: dict[str, Any] = {}
    diag = np.diag(a)
    dmax = float(diag.max()) if k else 0.0
    mean = np.full(k, 1.0 / k)
    if not dmax > 0.0:
        info["fallback"] = "all gradients are zero; used mean weights"
        return mean, info
    keep = diag > 1e-20 * dmax
    w = np.zeros(k)
    if not keep.all():
        info["fallback"] = (
            f"{int((~keep).sum())} zero gradient row(s) get weight 0; solved on the others"
        )
    sub = a[np.ix_(keep, keep)]
    guess = None
    if w0 is not None and w0.shape == (k,) and np.all(w0[keep] > 0):
        guess = w0[keep]

    def zero_in_hull() -> bool:
        # 0 is in the hull of the g_i iff it is in the hull of the g_i/|g_i|: test on the
        # unit-diagonal Gramian, so a small (non-zero) gradient does not look like 0
        unit = np.sqrt(np.diag(sub))
        return min_norm_sq(sub / np.outer(unit, unit)) <= max(HULL_FLOOR, 10.0 * eps)

    # Newton converges in < 20 iterations unless the problem is (nearly) degenerate; only
    # then is the degeneracy test (an MGDA solve) worth its cost. A root certifies that 0
    # is not in the hull (g_iᵀ(Gᵀw) = (Aw)_i > 0 for all i) -- unless, in a low-precision
    # Gramian, some (Aw)_i is within 10× its rounding error: then the test decides.
    sol, iters, res, last = power_fixed_point(sub, p, w0=guess, max_iter=30)
    degenerate = False
    if sol is not None and eps > 1e-12 and power_rounding_floor(sub, sol, eps) > 0.1:
        degenerate = zero_in_hull()
        if degenerate:
            sol = None
    if sol is None and not degenerate:
        degenerate = zero_in_hull()
        if not degenerate and last is not None and np.all(np.isfinite(last)):
            sol, more, res, last = power_fixed_point(sub, p, w0=last, max_iter=300)
            iters += more
        if sol is None and not degenerate and last is not None and np.all(last > 0):
            # A solution exists (0 is not in the hull) but the residual cannot get below
            # float64's rounding of (Aw)_i where its terms cancel (Gramians whose rows
            # differ by orders of magnitude) or of w_i^p for a large p (FairGrad with a
            # tiny alpha): the last iterate is as exact as float64 allows, far better
            # than the mean weights. (Capped at 1e-4, this threw away roots exact to
            # 1e-16 whose residual's floor is 1e-3: FairGrad α = 0.1 with norms 1e3
            # apart, in 34 of 60 draws.)
            res = power_residual(sub, last, p)
            floor = power_rounding_floor(sub, last, p=p)
            info["residual_floor"] = floor
            if res <= min(0.1, max(1e-9, 10.0 * floor)):
                sol = last
    info["iterations"] = iters
    info["residual"] = res
    if sol is None:
        if degenerate:
            why = "0 is in the convex hull of the (non-zero) gradients: no positive solution"
        else:
            why = f"Newton solve did not converge (residual {res:.3g})"
        info["fallback"] = f"{why}; used mean weights"
        return mean, info
    w[keep] = sol
    return w, info
