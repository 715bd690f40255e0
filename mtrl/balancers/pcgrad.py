"""PCGrad: projecting conflicting gradients."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mtrl.balancers._solvers import check_seed, initial_rng_state, with_generator
from mtrl.balancers.base import Balancer
from mtrl.balancers.registry import register


def pcgrad_coefficients(a: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """Coefficients ``C`` (K×K) with projected gradient ``i`` equal to ``C[i] @ G``.

    ``orders[i]`` is the order in which the other tasks are visited for task ``i``. Each
    visit of ``j`` removes the component of the current projected ``g_i`` along ``g_j``
    when their inner product ``C[i] @ A[:, j]`` is negative (zero rows are skipped).
    """
    k = a.shape[0]
    coef = np.eye(k)
    diag = np.diag(a)
    rows = np.arange(k)
    for r in range(k - 1):
        js = orders[:, r]
        dots = np.einsum("ik,ki->i", coef, a[:, js])
        djj = diag[js]
        mask = (dots < 0) & (djj > 0)
        if mask.any():
            coef[rows[mask], js[mask]] -= dots[mask] / djj[mask]
    return coef


@register
class PCGrad(Balancer):
    """PCGrad: the mean of the task gradients after projecting away conflicts.

    For every task ``i``, in a random order of the other tasks ``j``: if the current
    ``g_i^PC · g_j < 0``, set ``g_i^PC ← g_i^PC − (g_i^PC·g_j / |g_j|²) g_j``. The direction
    is the mean of the ``g_i^PC``. Each projected gradient is tracked as a coefficient
    vector over the rows of G, so everything runs on the K×K Gramian.

    Paper: Yu, Kumar, Gupta, Levine, Hausman & Finn, "Gradient Surgery for Multi-Task
    Learning", NeurIPS 2020. Authors' code: https://github.com/tianheyu927/PCGrad; the
    multi-task RL version used by the CAGrad/SDMGrad/FairGrad papers is in mtrl's
    ``grad_manipulation`` agent (an independent random order per task, mean reduction).

    Defaults: ``seed=None`` (the order generator's seed is then drawn from torch's global
    generator). State: the generator state is the buffer ``rng_state``.

    Deviations from the authors' code: projections are exact (they divide by
    ``|g_j| + 1e-8``), zero gradient rows are skipped explicitly, and the random orders
    come from a seeded, checkpointed torch generator instead of NumPy's.
    """

    name = "pcgrad"
    reads_losses = False  # the weights come from the Gramian alone
    permutation_equivariant = False

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        self.seed = check_seed(seed)
        self.register_buffer("rng_state", initial_rng_state(self.seed))

    def weights(self, gram: Tensor | None, losses: Tensor | None) -> Tensor:
        a = gram.numpy()
        k = a.shape[0]
        if k == 1:
            return torch.ones(1, dtype=torch.float64)

        def draw(gen: torch.Generator) -> Tensor:
            return torch.rand(k, k - 1, generator=gen, dtype=torch.float64).argsort(dim=1)

        ranks = with_generator(self, draw).numpy()
        # map 0..K-2 onto the other tasks: for task i, index m -> m if m < i else m + 1
        orders = ranks + (ranks >= np.arange(k)[:, None])
        coef = pcgrad_coefficients(a, orders)
        self.info["orders"] = torch.from_numpy(orders)
        return torch.from_numpy(coef.mean(axis=0))
