"""UPGrad: unconflicting projection of gradients (Jacobian descent)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mtrl.balancers._solvers import dual_cone_weights
from mtrl.balancers.base import Balancer
from mtrl.balancers.registry import register


def upgrad_projections(a: np.ndarray) -> np.ndarray:
    """Rows ``v_i`` (K×K): ``Gᵀv_i`` is the projection of ``g_i/K`` onto the dual cone
    ``{d : G d ≥ 0}``, i.e. ``v_i = argmin_{v ≥ e_i/K} vᵀAv`` (see
    :func:`~mtrl.balancers._solvers.dual_cone_weights`)."""
    k = a.shape[0]
    eye = np.eye(k) / k
    return np.stack([dual_cone_weights(a, eye[i]) for i in range(k)])


@register
class UPGrad(Balancer):
    """UPGrad: the mean of the projections of the task gradients onto the dual cone of all
    task gradients, ``(1/K) Σ_i π(g_i)`` with ``π(g) = argmin_{d: Gd ≥ 0} |d − g|``.

    By duality ``π(Gᵀu) = Gᵀv`` with ``v = argmin_{v ≥ u} vᵀGGᵀv``, so the K projections are
    K small QPs on the Gramian (quadprog). The result never conflicts with any task:
    ``g_iᵀd ≥ 0`` for all i.

    Paper: Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024
    (arXiv:2406.16232). Authors' code: https://github.com/TorchJD/torchjd
    (``UPGradWeighting``).

    Defaults: none (preference ``1/K``, i.e. torchjd's default mean weighting).

    Deviations from torchjd: it normalises the Gramian by its trace and adds a ridge
    ``reg_eps=1e-4`` to the normalised Gramian (which slightly biases the projections);
    we solve on the unit-diagonal Gramian (the QPs are invariant under diagonal scaling)
    with a ridge of 1e-12 that quadprog needs, and remove the ridge's bias by an
    unridged re-solve when the Gramian is numerically positive definite. What remains is
    the Gramian's own rounding, ~eps/λ_min relative (float64: measured against a D-space
    NNLS projection, ≤ 3e-15 for 200 random K ≤ D problems, 4e-8 when two gradients
    cancel to within 1e-4 of their norm). Float32 gradients whose cosine matrix is too
    close to singular for float32 (:data:`mtrl.balancers.base.GRAM_RESOLUTION`) get a
    float64 Gramian, so that bound holds for them too. Speed-ups that do not change the
    answer: no QP for a gradient that conflicts with no task, and block principal pivoting
    started from the set of tasks it conflicts with (quadprog only when that fails).
    Degenerate inputs: all-zero gradients give the mean weights (zero direction).
    """

    name = "upgrad"
    reads_losses = False  # the weights come from the Gramian alone

    def weights(self, gram: Tensor | None, losses: Tensor | None) -> Tensor:
        v = upgrad_projections(gram.numpy())
        self.info["projections"] = torch.from_numpy(v)
        return torch.from_numpy(v.sum(axis=0))
