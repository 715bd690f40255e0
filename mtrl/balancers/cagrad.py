"""CAGrad: conflict-averse gradient descent."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from mtrl.balancers._solvers import check_number, dual_cone_weights, simplex_qp
from mtrl.balancers.base import Balancer
from mtrl.balancers.registry import register


def _support_path(a: np.ndarray, b: np.ndarray, support: np.ndarray):
    """On a fixed support S, the simplex-QP solution of ``½wᵀAw + β bᵀw`` is ``u + β v``."""
    idx = np.flatnonzero(support)
    m = idx.size
    # Jacobi-scaled (w = D z, D = diag(1/|g_i|)): in w the system mixes entries 1e8 apart
    # when gradient norms are 1e4 apart, and the weights of long gradients, which fix the
    # direction, came out with too few digits
    dsc = 1.0 / np.sqrt(np.clip(np.diag(a)[idx], 1e-300, None))
    mat = np.zeros((m + 1, m + 1))
    mat[:m, :m] = a[np.ix_(idx, idx)] * np.outer(dsc, dsc)
    mat[:m, m] = dsc
    mat[m, :m] = dsc
    rhs = np.zeros((m + 1, 2))
    rhs[m, 0] = 1.0
    rhs[:m, 1] = -b[idx] * dsc
    try:
        sol = np.linalg.solve(mat, rhs)
    except np.linalg.LinAlgError:
        sol = np.linalg.lstsq(mat, rhs, rcond=None)[0]
    u = np.zeros(a.shape[0])
    v = np.zeros(a.shape[0])
    u[idx] = sol[:m, 0] * dsc
    v[idx] = sol[:m, 1] * dsc
    return u, v


def cagrad_kkt_residual(
    a: np.ndarray, b: np.ndarray, r: float, w: np.ndarray, unit: np.ndarray | None = None
) -> float:
    """KKT violation of ``w`` for ``min_{w∈Δ} bᵀw + r·sqrt(wᵀAw)`` (inf if |Gᵀw| = 0).

    ``unit`` (K,) scales each task's stationarity and complementarity terms (e.g.
    ``1/|g_i|`` with the largest norm 1): a task with a short gradient contributes terms
    of its size, and an absolute tolerance would not resolve its weight."""
    nrm = math.sqrt(max(float(w @ a @ w), 0.0))
    if nrm <= 1e-150:
        return math.inf
    grad = b + (r / nrm) * (a @ w)
    mu = float(w @ grad)
    scale = 1.0 if unit is None else unit
    dual = max(0.0, float(np.max((mu - grad) * scale)))
    comp = float(np.max(w * np.abs(grad - mu) * scale))
    primal = max(0.0, -float(w.min())) + abs(float(w.sum()) - 1.0)
    return max(dual, comp, primal)


def cagrad_dual(
    a: np.ndarray, r: float, tol: float = 1e-12, accept_tol: float = 1e-8, max_iter: int = 60
):
    """Solve ``min_{w∈Δ} wᵀ(A1/K) + r·sqrt(wᵀAw)`` (``A`` normalised, ``r > 0``).

    ``sqrt(q) = min_{s>0} (q/s + s)/2`` turns the problem into a one-dimensional search
    over ``β = s/r`` of simplex QPs ``w(β) = argmin ½wᵀAw + β bᵀw``; the optimum is the
    root of the non-decreasing ``f(β) = rβ − |Gᵀw(β)|``. On the support of ``w(β)`` the
    QP solution is affine in β, so the root on that support is a quadratic equation;
    the candidate is accepted when it satisfies the KKT conditions of the original
    problem, otherwise the bracket on β is updated (safeguarded by bisection).
    Stops at KKT residual ``tol·(1+r)``, or when the residual stagnates (8 iterations
    without halving) below ``accept_tol·(1+r)`` (round-off floor of an ill-conditioned
    Gramian). Returns ``(w, iterations, residual)``; ``w`` is ``None`` when the optimum
    has ``Gᵀw = 0`` (0 in the convex hull and no better point).
    """
    b = a.mean(axis=1)
    # each task's KKT terms in units of its own gradient norm (the largest is 1)
    unit = 1.0 / np.sqrt(np.clip(np.diag(a), 1e-16, None))
    scale_res = tol * (1.0 + r)
    lo, hi = 0.0, math.inf
    beta = math.sqrt(max(float(b.mean()), 1e-300)) / r  # |g0| / r: the uniform-w guess
    best_w, best_res, best_it = None, math.inf, 0

    def consider(cand: np.ndarray, it: int) -> float:
        """KKT residual of ``cand``; keeps the best iterate and when it last halved."""
        nonlocal best_w, best_res, best_it
        res = cagrad_kkt_residual(a, b, r, cand, unit)
        if res < 0.5 * best_res:
            best_it = it
        if res < best_res:
            best_w, best_res = cand, res
        return res

    for it in range(1, max_iter + 1):
        w = simplex_qp(a, beta * b)
        nrm = math.sqrt(max(float(w @ a @ w), 0.0))
        res = consider(w, it)
        if res <= scale_res:
            return w, it, res
        if it - best_it >= 8 and best_res <= accept_tol * (1.0 + r):
            return best_w, it, best_res  # stagnating at the round-off floor
        # exact root on the current support
        support = w > 1e-12
        u, v = _support_path(a, b, support)
        q0, q1, q2 = float(u @ a @ u), float(u @ a @ v), float(v @ a @ v)
        c2, c1, c0 = r * r - q2, -2.0 * q1, -q0
        roots = []
        if abs(c2) > 1e-14 * (r * r + q2):
            disc = c1 * c1 - 4 * c2 * c0
            if disc >= 0:
                sq = math.sqrt(disc)
                roots = [(-c1 + sq) / (2 * c2), (-c1 - sq) / (2 * c2)]
        elif c1 != 0:
            roots = [-c0 / c1]
        for root in sorted(x for x in roots if x > 0):
            cand = u + root * v
            if cand.min() < -1e-12:
                continue
            cand = np.clip(cand, 0.0, None)
            cand /= cand.sum()
            cres = consider(cand, it)
            if cres <= scale_res:
                return cand, it, cres
        # bracket update from the sign of f(beta) and the next trial point
        if r * beta - nrm < 0:
            lo = beta
        else:
            hi = beta
        inside = [x for x in roots if lo < x < hi]
        if inside and it < max_iter // 2:
            beta = min(inside, key=lambda x: abs(x - beta))
        elif math.isinf(hi):
            beta = 4.0 * beta
        elif lo == 0.0:
            beta = 0.25 * beta
            if beta < 1e-14:
                return None, it, best_res  # root at beta -> 0: optimum has G^T w = 0
        else:
            beta = math.sqrt(lo * hi)
        if math.isfinite(hi) and hi - lo <= 1e-15 * hi:
            break
    if best_w is not None and math.isfinite(best_res):
        return best_w, max_iter, best_res
    return None, max_iter, best_res


def _primal_polish(a: np.ndarray, b: np.ndarray, r: float, w: np.ndarray) -> np.ndarray | None:
    """The coefficients ``λ`` of ``d = g0 + Gᵀλ`` at the max-min optimum, recomputed in the
    primal on the support S of the dual solution ``w``: ``g_i·d = t`` on S and
    ``|Gᵀλ| = r``, in Jacobi-scaled variables ``y_i = λ_i |g_i|``. Where gradient norms lie
    1e4 and more apart, the dual fixes the tiny weights of long gradients (which set the
    direction) to fewer digits than the direction needs. ``None`` if the support's
    gradients are dependent or the polished point is not a valid optimum."""
    idx = np.flatnonzero(w > 0)
    norms = np.sqrt(np.clip(np.diag(a)[idx], 0.0, None))
    if idx.size == 0 or not np.all(norms > 0):
        return None
    cos = a[np.ix_(idx, idx)] / np.outer(norms, norms)
    try:
        p, q = np.linalg.solve(cos, np.stack([1.0 / norms, b[idx] / norms], axis=1)).T
    except np.linalg.LinAlgError:
        return None
    # (t p - q)ᵀ C (t p - q) = r²: the larger root t is the max-min value
    pp, pq, qq = float(p @ cos @ p), float(p @ cos @ q), float(q @ cos @ q)
    disc = pq * pq - pp * (qq - r * r)
    if not (pp > 0 and disc >= 0):
        return None
    t = (pq + math.sqrt(disc)) / pp
    lam = np.zeros(a.shape[0])
    lam[idx] = (t * p - q) / norms
    if lam.min() < 0:
        return None
    values = b + a @ lam  # g_i·d for every task (normalised): the support's must be least
    if values.min() < t - 1e-9 * (abs(t) + 1.0):
        return None
    return lam


#: Largest accepted ``c``.
C_MAX = 1e6


@register
class CAGrad(Balancer):
    """Conflict-averse gradient descent.

    Direction ``d = (g0 + (c·|g0| / |Gᵀw|) Gᵀw) / (1 + c²)`` with ``g0`` the mean gradient
    and ``w`` the solution of the dual ``min_{w∈Δ} g_wᵀg0 + c|g0|·|g_w|`` (``g_w = Gᵀw``),
    i.e. in Gramian terms ``wᵀ(GGᵀ1/K) + c|g0|·sqrt(wᵀGGᵀw)``. Before the ``1/(1+c²)``
    rescale, ``d`` maximises ``min_i g_iᵀd`` over the ball ``|d − g0| ≤ c|g0|``.

    Paper: Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task
    Learning", NeurIPS 2021. Authors' code: https://github.com/Cranial-XIX/CAGrad
    (``mtrl/mtrl_files/cagrad.py``, ``rescale=1``).

    Defaults: ``c=0.9`` (the authors' MT10 value; they use 0.5 on MT50). ``c=0`` is the mean.
    ``c`` is limited to :data:`C_MAX` (the paper studies ``c < 1``; far beyond, ``1 + c²``
    overflows and the direction shrinks like ``1/c``).

    Deviations from the authors' code: their RL code parametrises w by a softmax and runs
    20 SGD steps (lr 25, or 50 at K=50, momentum 0.5) keeping the best iterate, with
    ``1e-4`` stabilisers inside square roots and denominators; we solve the dual exactly
    (a one-dimensional search over simplex QPs, quadprog, with an exact quadratic step on
    the active set) to KKT residual ~1e-12 (each task's terms in units of its own
    gradient norm; the inner simplex QPs and the active-set step are Jacobi-scaled, so
    small gradients are not lost), then recompute the coefficients of ``Gᵀw`` on the
    dual's support in the primal (equal ``g_i·d`` there, ``|d − g0| = c|g0|``), which
    keeps the max-min value to ~1e-9 with gradient norms 1e8 apart (the dual weights
    alone left it 3e-5 short), and use no stabilisers. When the dual optimum
    has ``Gᵀw = 0`` (0 lies in the convex hull of the gradients, e.g. a zero gradient row,
    and no other point is better; numerically: ``|Gᵀw| ≤ 10·sqrt(eps)·Σ w_i|g_i|``, the
    rounding noise of a Gramian formed with relative precision eps (the gradients' dtype,
    at least float32), plus 1e-9 of the largest gradient norm) the formula divides 0 by 0. The
    primal optimum value is then 0 and the projection ``p`` of ``g0`` onto the cone
    ``{d : Gd ≥ 0}`` lies in the ball, so it is a primal optimum: we return
    ``p / (1+c²)`` and set ``info["fallback"]``. A true optimum whose ``|Gᵀw|`` is
    small but not 0 cannot be told apart from this case at that precision and gets the
    same answer, which then is not max-min optimal (measured: float32 gradients, two
    rows opposite to within 3e-3 of their norm: primal value ~1e-6 against the exact
    0.013; with float64 gradients this takes |Gᵀw| below ~1.5e-7 of Σ w_i|g_i|). Note
    that K=1 or identical rows return ``g·(1+c)/(1+c²)``, not ``g``: that is the
    published formula.
    """

    name = "cagrad"
    reads_losses = False  # the weights come from the Gramian alone
    consensus_exact = False

    def __init__(self, c: float = 0.9) -> None:
        super().__init__()
        self.c = check_number("c", c, low=0.0, high=C_MAX)

    def weights(self, gram: Tensor | None, losses: Tensor | None) -> Tensor:
        a = gram.numpy()
        k = a.shape[0]
        mean = np.full(k, 1.0 / k)
        rescale = 1.0 / (1.0 + self.c**2)
        g0_sq = float(a.mean())  # |g0|² = 1ᵀA1 / K²
        scale = float(np.max(np.diag(a)))
        if self.c == 0.0 or not scale > 0.0:
            return torch.from_numpy(mean * rescale)
        if g0_sq <= 1e-30 * scale:  # the ball around g0 is the point g0 = 0
            self.info["fallback"] = (
                "the mean gradient g0 is 0 (|g0|² <= 1e-30 of the largest |g_i|²): "
                "the direction is g0 (mean weights)"
            )
            return torch.from_numpy(mean * rescale)
        a_s = a / scale
        r = self.c * math.sqrt(g0_sq / scale)
        w, iters, res = cagrad_dual(a_s, r)
        self.info["iterations"] = iters
        self.info["kkt_residual"] = res
        nrm = 0.0 if w is None else math.sqrt(max(float(w @ a_s @ w), 0.0))
        # The Gramian is formed in the gradients' precision (at least float32, see
        # gramian_of_blocks), each entry to relative precision ~eps: |Gᵀw| below sqrt(eps)
        # times the norm it would have without cancellation (Σ w_i |g_i|) is rounding
        # noise, and dividing by it would amplify that noise; so is anything below the
        # dual solve's own accuracy (~1e-12 of the largest gradient norm, here 1).
        eps = self.gram_eps()
        uncancelled = 0.0 if w is None else float(w @ np.sqrt(np.clip(np.diag(a_s), 0, None)))
        if nrm <= 10.0 * math.sqrt(eps) * uncancelled + 1e-9:
            # Degenerate dual (Gᵀw = 0): the primal optimum value is 0, and the projection
            # of g0 onto {d : Gd ≥ 0} lies in the ball, so it is a primal optimum.
            self.info["fallback"] = (
                "dual optimum has G^T w = 0 (0 in the convex hull of the gradients); "
                "used the projection of g0 onto the cone {d: G d >= 0}"
            )
            return torch.from_numpy(dual_cone_weights(a_s, mean) * rescale)
        lam = (r / nrm) * w
        b = a_s.mean(axis=1)  # g_i·g0, normalised: g_i·d = b_i + (A λ)_i
        polished = _primal_polish(a_s, b, r, w)
        if polished is not None and (b + a_s @ polished).min() >= (b + a_s @ lam).min():
            lam = polished
        self.info["w"] = torch.from_numpy(lam / lam.sum())
        return torch.from_numpy((mean + lam) * rescale)
