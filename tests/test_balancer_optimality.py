"""Each balancer solves its sub-problem to convergence: KKT conditions, fixed-point
residuals, primal/dual certificates, and hand-checked FAMO updates."""

from __future__ import annotations

import math

import numpy as np
import pytest
import quadprog
import torch
from scipy.optimize import minimize

from mtrl.balancers import build
from mtrl.balancers.cagrad import cagrad_kkt_residual


def problem(k: int, d: int, seed: int, offset: float = 0.0) -> torch.Tensor:
    """Random gradients with different norms; ``offset`` > 0 makes them agree more."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(k, d, generator=gen, dtype=torch.float64)
    g = g * (0.2 + 3 * torch.rand(k, 1, generator=gen, dtype=torch.float64))
    return g + offset * torch.randn(1, d, generator=gen, dtype=torch.float64).abs()


CASES = [(2, 5, 0), (3, 10, 1), (10, 40, 2), (10, 40, 3), (50, 120, 4), (8, 4, 5), (50, 20, 6)]


def project_simplex(v: np.ndarray) -> np.ndarray:
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    rho = np.nonzero(u - css / np.arange(1, v.size + 1) > 0)[0][-1]
    return np.maximum(v - css[rho] / (rho + 1.0), 0.0)


# --------------------------------------------------------------------------- MGDA


@pytest.mark.parametrize("k, d, seed", CASES)
def test_mgda_kkt(k, d, seed):
    g = problem(k, d, seed)
    b = build("mgda")
    out = b.combine(g)
    w = b.info["weights"].numpy()
    a = (g @ g.T).numpy()
    scale = a.diagonal().max()
    assert w.min() >= 0 and abs(w.sum() - 1) < 1e-12
    aw = a @ w
    val = w @ aw
    # (A w)_i >= wᵀAw for all i, with equality where w_i > 0
    assert (aw - val).min() >= -1e-8 * scale
    assert np.abs((aw - val)[w > 1e-9]).max() <= 1e-8 * scale
    assert torch.allclose(out, torch.from_numpy(w) @ g)


# --------------------------------------------------------------------------- CAGrad


def cagrad_parts(g: torch.Tensor, c: float):
    b = build("cagrad", c=c)
    out = b.combine(g)
    d = out * (1 + c**2)  # undo the 1/(1+c²) rescale
    g0 = g.mean(0)
    r = c * float(g0.norm())
    return b, d, g0, r


@pytest.mark.parametrize("k, d, seed", CASES)
@pytest.mark.parametrize("c", [0.2, 0.5, 0.9, 2.0])
def test_cagrad_primal_dual_certificate(k, d, seed, c):
    g = problem(k, d, seed, offset=0.3)
    b, dvec, g0, r = cagrad_parts(g, c)
    assert "fallback" not in b.info
    w = b.info["w"].numpy()
    a = (g @ g.T).numpy()
    # primal feasibility: |d − g0| <= c|g0|
    assert float((dvec - g0).norm()) <= r * (1 + 1e-9)
    # weak duality: min_i g_iᵀd <= F(w) for every feasible d and w ∈ Δ; equality certifies
    # that d maximises the primal and w minimises the dual
    primal = float((g @ dvec).min())
    dual = float(w @ a.mean(axis=1) + r * math.sqrt(w @ a @ w))
    scale = float(a.diagonal().max())
    assert abs(primal - dual) <= 1e-8 * scale
    # dual KKT (on the normalised problem the solver sees)
    assert cagrad_kkt_residual(a / scale, a.mean(axis=1) / scale, r / math.sqrt(scale), w) < 1e-9


@pytest.mark.parametrize("seed", range(4))
def test_cagrad_matches_scipy_primal(seed):
    k, dim, c = 4, 5, 0.6
    g = problem(k, dim, seed, offset=0.2)
    _, dvec, g0, r = cagrad_parts(g, c)
    gn, g0n = g.numpy(), g0.numpy()

    # max t  s.t.  g_iᵀd >= t,  |d − g0|² <= r²  over x = (d, t)
    cons = [
        {"type": "ineq", "fun": lambda x: gn @ x[:dim] - x[dim]},
        {"type": "ineq", "fun": lambda x: r**2 - np.sum((x[:dim] - g0n) ** 2)},
    ]
    x0 = np.append(g0n, float((gn @ g0n).min()))
    res = minimize(
        lambda x: -x[dim],
        x0,
        constraints=cons,
        method="SLSQP",
        options={"ftol": 1e-12, "maxiter": 500},
    )
    # scipy's point is (nearly) feasible and no better than ours
    assert r**2 - np.sum((res.x[:dim] - g0n) ** 2) >= -1e-8
    scipy_value = float((gn @ res.x[:dim]).min())
    ours = float((g @ dvec).min())
    assert ours >= scipy_value - 1e-9
    if res.success:
        assert abs(ours - scipy_value) <= 1e-6
        assert np.allclose(dvec.numpy(), res.x[:dim], atol=1e-4)


# --------------------------------------------------------------------------- SDMGrad


@pytest.mark.parametrize("k, d, seed", CASES)
@pytest.mark.parametrize("lam", [0.0, 0.3, 0.6, 3.0])
def test_sdmgrad_projected_gradient_fixed_point(k, d, seed, lam):
    g = problem(k, d, seed)
    b = build("sdmgrad", lam=lam)
    out = b.combine(g)
    w = b.info["w"].numpy()
    a = (g @ g.T).numpy()
    grad = a @ w + lam * a.mean(axis=1)  # ∇ ½|Gᵀw + λ g0|²
    step = 1.0 / np.linalg.eigvalsh(a).max()
    moved = project_simplex(w - step * grad)
    assert np.abs(moved - w).max() <= 1e-9
    expect = (torch.from_numpy(w) @ g + lam * g.mean(0)) / (1 + lam)
    assert torch.allclose(out, expect, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- fixed points


@pytest.mark.parametrize("k, d", [(10, 60), (50, 300)])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    "name, alpha",
    [
        ("nash-mtl", 1.0),
        ("fairgrad", 2.0),
        ("fairgrad", 0.5),
        ("fairgrad", 1.0),
        ("fairgrad", 10.0),
    ],
)
def test_fixed_point_residual(k, d, seed, name, alpha):
    g = problem(k, d, seed, offset=0.5)  # well conditioned: 0 far from the convex hull
    assert_positive_fixed_point(g, name, alpha)


def assert_positive_fixed_point(g: torch.Tensor, name: str, alpha: float) -> None:
    """No fallback, positive weights, (G Gᵀ w)_i w_i^(1/α) = 1 to 1e-8, direction Gᵀw."""
    b = build(name) if name == "nash-mtl" else build(name, alpha=alpha)
    out = b.combine(g)
    assert "fallback" not in b.info
    w = b.info["weights"].numpy()
    a = (g @ g.T).numpy()
    assert w.min() > 0
    assert np.abs((a @ w) * w ** (1.0 / alpha) - 1.0).max() < 1e-8
    assert torch.allclose(out, torch.from_numpy(w) @ g)


def test_nash_warm_start_same_answer():
    g = problem(10, 60, 0, offset=0.5)
    b = build("nash-mtl")
    b.combine(g)
    first = b.info["weights"].clone()
    g2 = g + 0.01 * problem(10, 60, 1)
    cold = build("nash-mtl")
    cold.combine(g2)
    b.combine(g2)  # warm-started from `first`
    assert torch.allclose(b.info["weights"], cold.info["weights"], rtol=1e-10)
    assert not torch.allclose(first, cold.info["weights"])


# --------------------------------------------------------------------------- UPGrad


def _reference_projection(a: np.ndarray, u: np.ndarray) -> np.ndarray:
    """quadprog only, on the same normalisation: min vᵀAv s.t. v >= u."""
    k = a.shape[0]
    a_s = a / np.trace(a) + 1e-12 * np.eye(k)
    return quadprog.solve_qp(a_s, np.zeros(k), np.eye(k), u, 0)[0]


@pytest.mark.parametrize("k, d, seed", CASES)
def test_upgrad_non_conflicting_and_kkt(k, d, seed):
    g = problem(k, d, seed)
    b = build("upgrad")
    out = b.combine(g)
    a = (g @ g.T).numpy()
    scale = float(np.trace(a))
    # never conflicts with any task
    assert float((g @ out).min()) >= -1e-9 * scale
    proj = b.info["projections"].numpy()
    for i in range(k):
        u = np.eye(k)[i] / k
        v = proj[i]
        mu = a @ v  # multipliers of v >= u: μ >= 0, μ ⊙ (v − u) = 0
        assert (v - u).min() >= -1e-12
        assert mu.min() >= -1e-9 * scale
        assert np.abs(mu * (v - u)).max() <= 1e-9 * scale * max(1.0, float(v.max()))
        ref = _reference_projection(a, u)
        assert np.allclose(a @ v, a @ ref, atol=1e-8 * scale)
    assert np.allclose(b.info["weights"].numpy(), proj.sum(axis=0))


# --------------------------------------------------------------------------- IMTL-G, Aligned


@pytest.mark.parametrize("k, d, seed", [(2, 5, 0), (3, 10, 1), (10, 40, 2), (50, 120, 4)])
def test_imtl_g_equal_projections(k, d, seed):
    g = problem(k, d, seed)
    b = build("imtl-g")
    out = b.combine(g)
    w = b.info["weights"]
    assert abs(float(w.sum()) - 1) < 1e-10
    proj = (g / g.norm(dim=1, keepdim=True)) @ out
    assert float(proj.max() - proj.min()) <= 1e-8 * float(proj.abs().max())


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("k, d", [(2, 2), (3, 1000), (10, 1000)])
@pytest.mark.parametrize("factor", [1e3, 1e6])
def test_imtl_g_equal_projections_with_very_different_norms(k, d, factor, dtype, tol):
    """One gradient 1e3 or 1e6 times longer: the system in A/max(A) took the short rows
    for rounding (float32 projections [30925, 1828, -1538] at K=3, ratio 1e3, with a false
    "K exceeds the rank" fallback; float64 K=2 off by 4.8 %). Solved in cosines: exact."""
    g = torch.from_numpy(np.random.default_rng(0).standard_normal((k, d)))
    g[0] *= factor
    b = build("imtl-g")
    out = b.combine(g.to(dtype)).double()
    proj = (g / g.norm(dim=1, keepdim=True)) @ out
    assert float(proj.max() - proj.min()) <= tol * float(proj.abs().max())
    assert "fallback" not in b.info


@pytest.mark.parametrize("noise", [0.0, 1e-7])
def test_imtl_g_nearly_opposite_pair_gives_the_zero_direction(noise):
    """g1 = -0.7 g0 (+ 1e-7 noise: full rank): the sum-1 weights (0.7, 1)/1.7 give d = 0,
    equal (zero) projections, as the closed form does. Solving C β = 1 (projections fixed
    at 1) had no solution: weights (-2.33, 3.33), d = -4.67 g0 against task 0, and a note
    that K exceeds the rank."""
    g0 = torch.tensor([1.0, 2.0, -0.5, 0.3, 1.2], dtype=torch.float64)
    extra = torch.tensor([0.3, -1.0, 0.2, 0.5, -0.4], dtype=torch.float64)
    g = torch.stack([g0, -0.7 * g0 + noise * extra])
    b = build("imtl-g")
    d = b.combine(g)
    assert "fallback" not in b.info, b.info["fallback"]
    assert torch.allclose(b.info["weights"], torch.tensor([0.7, 1.0], dtype=torch.float64) / 1.7,
                          atol=1e-6)
    assert float(d.norm()) <= 1e-6 * float(g0.norm())
    # and with a third task the projections are still equal
    g3 = torch.cat([g, torch.randn(1, 5, generator=torch.Generator().manual_seed(0),
                                   dtype=torch.float64)])
    b = build("imtl-g")
    d = b.combine(g3)
    proj = (g3 / g3.norm(dim=1, keepdim=True)) @ d
    assert float(proj.max() - proj.min()) <= 1e-8 * float(g3.norm(dim=1).max())
    assert abs(float(b.info["weights"].sum()) - 1.0) < 1e-12


@pytest.mark.parametrize("k, d, seed", [(2, 5, 0), (3, 10, 1), (10, 40, 2), (50, 120, 4)])
def test_aligned_mtl_balanced_components(k, d, seed):
    g = problem(k, d, seed)
    a = g @ g.T
    lam, vec = torch.linalg.eigh(a)
    # Gᵀ B: orthogonal components of equal norm σ_min  ⇔  B A B = λ_min I
    bmat = (vec * (lam.min() / lam).sqrt()) @ vec.T
    assert torch.allclose(bmat @ a @ bmat, lam.min() * torch.eye(k, dtype=a.dtype), atol=1e-8)
    b = build("aligned-mtl")
    b.combine(g)
    assert torch.allclose(b.info["weights"], bmat.mean(dim=1), rtol=1e-8, atol=1e-12)


# --------------------------------------------------------------------------- PCGrad


def _pcgrad_dspace(g: torch.Tensor, orders: np.ndarray) -> torch.Tensor:
    out = []
    for i in range(g.shape[0]):
        gi = g[i].clone()
        for j in orders[i]:
            dot = gi @ g[j]
            if dot < 0:
                gi = gi - dot / (g[j] @ g[j]) * g[j]
        out.append(gi)
    return torch.stack(out).mean(0)


@pytest.mark.parametrize("k, d, seed", [(3, 4, 0), (5, 10, 1), (10, 40, 2), (8, 3, 5)])
def test_pcgrad_matches_d_space(k, d, seed):
    g = problem(k, d, seed)
    b = build("pcgrad", seed=seed)
    out = b.combine(g)
    orders = b.info["orders"].numpy()
    for i in range(k):  # each row visits every other task exactly once
        assert sorted(orders[i].tolist()) == [j for j in range(k) if j != i]
    assert torch.allclose(out, _pcgrad_dspace(g, orders), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- FAMO


def test_famo_weights_formula():
    b = build("famo")
    losses = torch.tensor([0.5, 2.0, 1.0, 4.0], dtype=torch.float64)
    b.logits = torch.tensor([0.3, -0.2, 0.0, 0.5], dtype=torch.float64)
    g = problem(4, 7, 0)
    out = b.combine(g, losses)
    z = torch.softmax(b.logits, 0)
    shifted = losses + 1e-8
    w = (z / shifted) / (z / shifted).sum()
    assert torch.allclose(b.info["weights"], w, rtol=1e-14)
    assert torch.allclose(out, w @ g)
    # the direction is the gradient of Σ z_i log ℓ_i divided by c = Σ z_j/ℓ_j
    assert torch.allclose(out, ((z / shifted) @ g) / (z / shifted).sum())


def test_famo_first_update_by_hand():
    gamma, lr = 0.01, 0.025
    b = build("famo", gamma=gamma, lr=lr)
    before = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    after = torch.tensor([0.5, 1.9, 4.2], dtype=torch.float64)  # task 0 improved most
    b.combine(problem(3, 5, 0), before)
    b.after_step(after)
    delta = torch.log(before + 1e-8) - torch.log(after + 1e-8)
    z = torch.full((3,), 1 / 3, dtype=torch.float64)
    grad = z * (delta - (z * delta).sum())  # softmax VJP; ξ = 0 so no weight decay term
    # first Adam step: m̂ = grad, v̂ = grad², ξ = −lr·grad / (|grad| + eps)
    expected = -lr * grad / (grad.abs() + 1e-8)
    assert torch.allclose(b.logits, expected, rtol=1e-12, atol=1e-15)
    # the task that improved most loses weight, the one that got worse gains
    assert b.logits[0] < 0 < b.logits[2]
    w = b.weights(None, before)
    assert w[0] < 4 / 7  # its weight at equal logits is (1/1)/(1 + 1/2 + 1/4)


def test_famo_matches_torch_adam_reference():
    """Same updates as the authors' loop: softmax VJP + torch.optim.Adam(weight_decay)."""
    gamma, lr, k = 0.01, 0.025, 5
    b = build("famo", gamma=gamma, lr=lr)
    xi = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([xi], lr=lr, weight_decay=gamma)
    gen = torch.Generator().manual_seed(0)
    for _ in range(25):
        loss = torch.rand(k, generator=gen, dtype=torch.float64) + 0.1
        loss_after = loss * (0.8 + 0.4 * torch.rand(k, generator=gen, dtype=torch.float64))
        b.combine(torch.randn(k, 3, generator=gen, dtype=torch.float64), loss)
        b.after_step(loss_after)
        delta = (loss + 1e-8).log() - (loss_after + 1e-8).log()
        opt.zero_grad()
        xi.grad = torch.autograd.grad(torch.softmax(xi, -1), xi, grad_outputs=delta)[0]
        opt.step()
        assert torch.allclose(b.logits, xi.detach(), rtol=1e-10, atol=1e-13)
    assert int(b.adam_step) == 25


# --------------------------------------------------------------------------- very different norms
# One task's gradient 1e6 times larger or smaller than the others': conditions are checked
# per task, at that task's own scale (a check at the largest scale cannot see the small rows).


def lopsided(factor: float, seed: int, k: int = 5, d: int = 8, offset: float = 0.0):
    g = problem(k, d, seed, offset=offset)
    g[2] *= factor
    return g


def simplex_qp_by_enumeration(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``argmin_{w∈Δ} ½wᵀAw + bᵀw`` by brute force over every support (small K only)."""
    import itertools

    k, best, best_val = a.shape[0], None, math.inf
    for m in range(1, k + 1):
        for support in itertools.combinations(range(k), m):
            s = list(support)
            mat = np.ones((m + 1, m + 1))
            mat[:m, :m], mat[m, m] = a[np.ix_(s, s)], 0.0
            rhs = np.append(-b[s], 1.0)
            x = np.linalg.lstsq(mat, rhs, rcond=None)[0][:m]
            if x.min() < -1e-12:
                continue
            w = np.zeros(k)
            w[s] = np.clip(x, 0.0, None) / np.clip(x, 0.0, None).sum()
            val = 0.5 * w @ a @ w + b @ w
            if val < best_val:
                best, best_val = w, val
    return best


def min_norm_by_enumeration(a: np.ndarray) -> np.ndarray:
    """MGDA by brute force (small K only)."""
    return simplex_qp_by_enumeration(a, np.zeros(a.shape[0]))


@pytest.mark.parametrize("factor", [1e-6, 1e3, 1e6])
@pytest.mark.parametrize("seed", range(3))
def test_mgda_with_very_different_norms(factor, seed):
    g = lopsided(factor, seed)
    out = build("mgda").combine(g)
    ref = torch.from_numpy(min_norm_by_enumeration((g @ g.T).numpy())) @ g
    # relative error, plus round-off of weights ~1e-16 on the largest gradient
    tol = 1e-9 * float(ref.norm()) + 1e-14 * float(g.norm(dim=1).max())
    assert float((out - ref).norm()) <= tol
    # g_iᵀd >= |d|² for every task, at the task's own scale |g_i||d|
    slack = (g @ out - out.dot(out)) / (g.norm(dim=1) * out.norm())
    assert float(slack.min()) >= -1e-10


@pytest.mark.parametrize("factor", [1e-6, 1e6])
@pytest.mark.parametrize("seed", range(3))
def test_upgrad_with_very_different_norms(factor, seed):
    g = lopsided(factor, seed, k=6)
    b = build("upgrad")
    out = b.combine(g)
    # never conflicts with any task, at each task's own scale
    cos = (g @ out) / (g.norm(dim=1) * out.norm())
    assert float(cos.min()) >= -1e-10
    for i, v in enumerate(b.info["projections"].numpy()):
        p = torch.from_numpy(v) @ g  # the projection of g_i/K onto the dual cone
        x = v - np.eye(6)[i] / 6  # its multipliers: x >= 0, g_jᵀp >= 0, x_j g_jᵀp = 0
        gp = (g @ p / (g.norm(dim=1) * p.norm())).numpy()
        assert x.min() >= -1e-12 and gp.min() >= -1e-10
        assert np.abs(x * gp).max() <= 1e-10 * max(1.0, float(np.abs(x).max()))


@pytest.mark.parametrize("factor", [1e-4, 1e6])  # (below 1e-4 the dual's KKT tolerance,
@pytest.mark.parametrize("seed", range(3))  # relative to the largest norm, shows)
def test_cagrad_with_very_different_norms(factor, seed):
    g = lopsided(factor, seed, offset=0.3)
    c = 0.9
    b, dvec, g0, r = cagrad_parts(g, c)
    assert "fallback" not in b.info
    w = b.info["w"].numpy()
    a = (g @ g.T).numpy()
    primal = float((g @ dvec).min())
    dual = float(w @ a.mean(axis=1) + r * math.sqrt(w @ a @ w))
    # the duality gap at the scale of the smallest task's g_iᵀg0
    assert abs(primal - dual) <= 1e-8 * float(g.norm(dim=1).min() * g0.norm())
    assert float((dvec - g0).norm()) <= r * (1 + 1e-9)


@pytest.mark.parametrize("name, alpha", [("nash-mtl", 1.0), ("fairgrad", 2.0), ("fairgrad", 0.5)])
@pytest.mark.parametrize("factor", [1e-8, 1e8])
def test_fixed_points_with_very_different_norms(name, alpha, factor):
    """A positive solution exists (0 is far from the hull of the unit gradients): no
    fallback to mean weights however small or large one gradient is."""
    assert_positive_fixed_point(lopsided(factor, 0, k=6, d=20, offset=0.5), name, alpha)


@pytest.mark.parametrize("scales", [(1e-3, 1e-9), (1e-3, 1e-12), (1e-4, 1e-14)])
def test_simplex_qp_with_a_linear_term_and_tiny_rows(scales):
    """SDMGrad's problem (b = λ A 1/K) with two rows far smaller than the others: the
    Jacobi-scaled solve must not fail or stop early (it falls back to the common scale)."""
    from mtrl.balancers._solvers import simplex_qp

    rng = np.random.default_rng(5)
    for _ in range(30):
        g = rng.standard_normal((5, 8))
        g[0] *= scales[0]
        g[1] *= scales[1]
        a = g @ g.T
        b = 0.6 * a.mean(axis=1)
        w, ref = simplex_qp(a, b), simplex_qp_by_enumeration(a, b)
        ours, best = (0.5 * x @ a @ x + b @ x for x in (w, ref))
        assert ours <= best + 1e-9 * abs(best) + 1e-15 * float(np.abs(a).max())
    g = torch.tensor([[1.0, -1.0, 0.0], [1e-6, 2e-6, 3e-6], [1e-13, 0.0, 0.0]],
                     dtype=torch.float64)  # quadprog refused the scaled problem here
    for name in ("sdmgrad", "cagrad"):
        assert torch.isfinite(build(name).combine(g)).all()


def test_simplex_qp_never_worse_than_the_common_scale_and_never_nan():
    """The Jacobi-scaled solve falls back to (and is compared with) the common-scale one;
    quadprog returning no usable point must not turn into NaN weights."""
    from mtrl.balancers._solvers import _simplex_solve, simplex_qp

    a = np.array([[1.1220839945283837e-20, -3.5155289663522923e-12],
                  [-3.5155289663522923e-12, 1.1014276982407656e-03]])
    b = np.array([-1.0553529696781704e-08, 1.6434841356898055e-09])
    assert np.allclose(simplex_qp(a, b), [1.0, 0.0])  # was [nan, nan]
    rng = np.random.default_rng(2)
    for _ in range(400):
        k = int(rng.integers(2, 5))
        g = rng.standard_normal((k, int(rng.integers(1, 4))))
        g *= 10.0 ** rng.uniform(-14, 0, size=(k, 1))
        a = g @ g.T
        a /= np.diag(a).max()
        b = rng.standard_normal(k) * 10.0 ** rng.uniform(-10, 0)
        w = simplex_qp(a, b)
        assert np.all(np.isfinite(w)) and abs(w.sum() - 1) < 1e-12 and w.min() >= 0
        common, _ = _simplex_solve(a, b, None, np.ones(k), strict=False)
        f, f_common = (0.5 * x @ a @ x + b @ x for x in (w, common))
        assert f <= f_common + 1e-10 * (1 + np.abs(b).max())


@pytest.mark.parametrize("mismatch, tol", [(1e-3, 1e-8), (1e-4, 1e-6)])
def test_upgrad_exact_with_two_nearly_opposite_gradients(mismatch, tol):
    """g_1 = -1.3 g_0 + small noise: the Gramian's smallest eigenvalue falls below the
    solvers' ridge, whose bias moved the direction by 4e-6 / 4e-4 (mismatch 1e-3 / 1e-4);
    now only the float64 Gramian's own rounding (~1e-16 / λ_min) remains. Reference: each
    projection onto {d : Gd ≥ 0} in D-space, by Moreau's decomposition
    P(g) = g + Gᵀλ, λ = argmin_{λ ≥ 0} |g + Gᵀλ| (scipy's NNLS, no Gramian)."""
    from scipy.optimize import nnls

    rng = np.random.default_rng(17)
    k, d = 6, 20
    g = rng.standard_normal((k, d))
    g[1] = -1.3 * g[0] + mismatch * np.linalg.norm(g[0]) * rng.standard_normal(d) / math.sqrt(d)
    ref = np.mean([gi + g.T @ nnls(g.T, -gi)[0] for gi in g], axis=0)
    out = build("upgrad").combine(torch.from_numpy(g)).numpy()
    assert np.linalg.norm(out - ref) <= tol * np.linalg.norm(ref)


# Two exactly opposite gradients stored in float32 (g1 = -c g0): the unit-diagonal
# Gramian's smallest eigenvalue is -1e-12..0, inside the solvers' ridge. Iterative removal
# of the ridge's bias amplified that direction (weights ~1e96, a NaN direction).
_OPPOSITE_F32 = [
    [["0x1.0033aa0000000p+1", "0x1.cf37ae0000000p-3", "-0x1.15fb1e0000000p-1",
      "0x1.a9a1bc0000000p-1", "0x1.6b05140000000p-1", "-0x1.7d7a220000000p-1",
      "0x1.600c460000000p+1"],
     ["-0x1.0033920000000p-1", "-0x1.cf37840000000p-5", "0x1.15fb060000000p-3",
      "-0x1.a9a1960000000p-3", "-0x1.6b04f40000000p-3", "0x1.7d7a000000000p-3",
      "-0x1.600c260000000p-1"]],
    [["-0x1.826b980000000p-2", "-0x1.eb47700000000p-3", "0x1.a463c60000000p-3",
      "-0x1.ae29900000000p+0", "0x1.1359a80000000p+0", "0x1.1f6a160000000p-1"],
     ["0x1.ae950a0000000p+0", "0x1.11b65c0000000p+0", "-0x1.d46f100000000p-1",
      "0x1.df52c40000000p+2", "-0x1.32d18a0000000p+2", "-0x1.4042ee0000000p+1"]],
]  # fmt: skip


@pytest.mark.parametrize("rows", _OPPOSITE_F32)
def test_upgrad_opposite_float32_gradients_stay_bounded(rows):
    g = torch.tensor([[float.fromhex(x) for x in r] for r in rows], dtype=torch.float32)
    b = build("upgrad")
    d = b.combine(g)
    assert torch.isfinite(d).all()
    # the cone {d : Gd >= 0} is (nearly) the hyperplane g0ᵀd = 0: the projections cancel
    assert float(d.norm()) <= 1e-5 * float(g[0].norm())
    assert float(b.info["weights"].abs().max()) < 1e3


@pytest.mark.parametrize("k, d, duplicate", [(10, 2000, True), (50, 10, False), (12, 3, False)])
def test_upgrad_singular_gramians_match_nnls(k, d, duplicate):
    """Duplicated tasks or K > D: the Gramian is singular, the weights are not unique,
    the direction is; it matches D-space projections (scipy NNLS)."""
    from scipy.optimize import nnls

    rng = np.random.default_rng(k + d)
    g = rng.standard_normal((k, d))
    if duplicate:
        g[k // 2:] = g[: k - k // 2]
    ref = np.mean([gi + g.T @ nnls(g.T, -gi, maxiter=50 * k)[0] for gi in g], axis=0)
    b = build("upgrad")
    out = b.combine(torch.from_numpy(g)).numpy()
    scale = float(np.abs(g).max())
    assert np.abs(out - ref).max() <= 1e-9 * scale
    assert float(b.info["weights"].abs().max()) < 1e3


@pytest.mark.parametrize("seed, mismatch, tol", [(1, 1e-6, 3e-4), (1, 1e-5, 1e-5),
                                                 (2, 1e-5, 1e-5)])
def test_upgrad_near_opposite_pair_with_a_duplicated_task(seed, mismatch, tol):
    """A singular Gramian (task 4 = task 3) with two nearly opposite gradients: the
    ridge's bias is removed on the solution's support (1.8e-2 off when only a positive
    definite Gramian was re-solved).

    The bound is what the Gramian's own rounding allows: with a 1e-6 mismatch, moving
    each entry G_ij by 3 ulps of |g_i||g_j| (200 random draws) moves the exact solution
    by up to 7e-5 (median 1.8e-5) of max |g|, and the float64 product itself rounds
    differently with 1 or 2 threads (1.3e-5 vs 3.8e-7 here; the 1e-5 bound failed with
    OMP_NUM_THREADS=1). With a 1e-5 mismatch the same draws move it by at most 8e-7."""
    from scipy.optimize import nnls

    rng = np.random.default_rng(seed)
    g = rng.standard_normal((5, 100))
    g[1] = -(1 + mismatch) * g[0] + mismatch * rng.standard_normal(100)
    g[4] = g[3]
    ref = np.mean([gi + g.T @ nnls(g.T, -gi)[0] for gi in g], axis=0)
    out = build("upgrad").combine(torch.from_numpy(g)).numpy()
    assert np.abs(out - ref).max() <= tol * np.abs(g).max()


@pytest.mark.parametrize("seed", [2, 119, 151])
def test_cagrad_max_min_with_gradient_norms_1e8_apart(seed):
    """Gradient norms spread over 1e-4..1e4: the dual weights of the long gradients are
    ~1e-8 and fix the direction, so the dual's own tolerance left the max-min value up to
    3e-5 (relative) short. The duality gap, computed from G directly (dual value of the
    reported w minus the primal value of d), bounds the shortfall: now ~1e-9 (float64
    rounding of Gramian entries 1e16 apart), against 1.2e-5 to 3.2e-5 before."""
    rng = np.random.default_rng(seed)
    k = int(rng.integers(3, 7))
    g = rng.standard_normal((k, 8)) * 10.0 ** rng.uniform(-4, 4, (k, 1))
    c = 3.0
    b = build("cagrad", c=c)
    d = b.combine(torch.from_numpy(g)).numpy() * (1 + c * c)
    g0 = g.mean(0)
    w = b.info["w"].numpy()
    primal = float((g @ d).min())
    dual = float(w @ (g @ g0) + c * np.linalg.norm(g0) * np.linalg.norm(g.T @ w))
    assert np.linalg.norm(d - g0) <= c * np.linalg.norm(g0) * (1 + 1e-12)  # inside the ball
    assert abs(dual - primal) <= 1e-8 * abs(dual), (primal, dual)
