"""Nash-MTL: the Nash bargaining solution between tasks."""

from __future__ import annotations

import torch
from torch import Tensor

from mtrl.balancers._solvers import check_number, get_buffer64, power_weights, set_buffer
from mtrl.balancers.base import Balancer
from mtrl.balancers.registry import register


@register
class NashMTL(Balancer):
    """Nash-MTL: direction ``Gᵀα`` with ``α > 0`` solving ``G Gᵀ α = 1/α``.

    This is the Nash bargaining solution (maximiser of ``Σ log g_iᵀd`` on the unit ball,
    up to scale). It is the unique minimiser of ``½αᵀAα − Σ log α_i``, found by damped
    Newton (warm-started from the previous α) to relative residual ≤ 1e-12.

    Paper: Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, "Multi-Task
    Learning as a Bargaining Game", ICML 2022. Authors' code:
    https://github.com/AvivNavon/nash-mtl (``methods/weight_methods.py``).

    Defaults: ``update_every=1`` (recompute α every call). With ``update_every=N`` the
    weights are recomputed on calls 0, N, 2N, ... and the cached α is reused (with the
    current gradients) in between, as in the authors' ``update_weights_every``.

    State (buffers, saved with checkpoints): ``alpha`` (cached weights, also the warm
    start) and ``step`` (call counter).

    Deviations from the authors' code: they solve a sequence of at most 20 convex
    approximations with cvxpy/ECOS (stopping at residual 1e-3 or step change 1e-6) and
    clip the gradient norm to ``max_norm=1`` after the backward pass; we solve the
    equation to convergence and never clip (clipping is a trainer option). Degenerate
    inputs: zero gradient rows get weight 0 and the equation is solved on the rest; if no
    positive solution exists (0 in the convex hull of the remaining gradients, judged at
    the Gramian's precision) we use the mean weights; both set ``info["fallback"]``. The
    direction is invariant to scaling all gradients (degree 0); K=1 returns ``g/|g|``.
    """

    name = "nash-mtl"
    reads_losses = False  # the weights come from the Gramian alone
    consensus_exact = False
    scale_degree = 0.0

    def __init__(self, update_every: int = 1) -> None:
        super().__init__()
        self.update_every = check_number("update_every", update_every, low=1, integer=True)
        self.register_buffer("alpha", torch.empty(0, dtype=torch.float64))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def weights(self, gram: Tensor | None, losses: Tensor | None) -> Tensor:
        k = gram.shape[0]
        step = int(self.step)
        cached = get_buffer64(self, "alpha")
        set_buffer(self, "step", torch.tensor(step + 1))
        if step % self.update_every != 0 and cached.shape == (k,):
            self.info["reused"] = True
            return cached
        self.info["reused"] = False
        w0 = cached.numpy() if cached.shape == (k,) else None
        w, info = power_weights(gram.numpy(), 1.0, w0=w0, eps=self.gram_eps())
        self.info.update(info)
        out = torch.from_numpy(w)
        set_buffer(self, "alpha", out)
        return out
