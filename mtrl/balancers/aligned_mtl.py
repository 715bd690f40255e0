"""Aligned-MTL: align the principal components of the task gradients."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mtrl.balancers.base import Balancer
from mtrl.balancers.registry import register

#: Rank tolerance factor of the authors' code (``torch.finfo().eps`` = float32 eps).
RANK_EPS = float(np.finfo(np.float32).eps)


@register
class AlignedMTL(Balancer):
    """Aligned-MTL: weights ``α = B·(1/K)`` with ``B = σ_min · V Λ^(-1/2) Vᵀ``.

    ``GGᵀ = VΛVᵀ`` is the eigendecomposition of the Gramian, truncated to its numerical
    rank (eigenvalues above ``λ_max · K · ε_float32``, the authors' tolerance), and
    ``σ_min = sqrt(λ_min)`` the smallest kept singular value. ``GᵀB`` are the gradients
    made orthogonal with equal norms ``σ_min`` (the stable linear system of the paper);
    the direction is their combination with preference weights ``1/K``.

    Paper: Senushkin, Patakin, Kuznetsov & Konushin, "Independent Component Alignment for
    Multi-Task Learning", CVPR 2023. Authors' code: https://github.com/SamsungLabs/MTL
    (``code/optim/aligned/solver.py``, ``scale_mode='min'``).

    Defaults: none (``scale_mode='min'``). Scale: we use the preference vector ``1/K``
    (sum 1), so orthogonal equal-norm gradients and identical gradients return their mean,
    as DESIGN.md's mean-scale convention asks; the authors sum the aligned gradients
    (preference vector of ones, a factor K larger).

    Deviations: the eigendecomposition runs in float64 with ``numpy.linalg.eigh``.
    Degenerate inputs: all-zero gradients (rank 0) give ``B = I`` (mean weights, zero
    direction), as in torchjd.
    """

    name = "aligned-mtl"
    reads_losses = False  # the weights come from the Gramian alone

    def weights(self, gram: Tensor | None, losses: Tensor | None) -> Tensor:
        a = gram.numpy()
        k = a.shape[0]
        pref = np.full(k, 1.0 / k)
        lam, vec = np.linalg.eigh(0.5 * (a + a.T))
        tol = float(lam.max()) * k * RANK_EPS
        keep = lam > tol
        if not keep.any() or not float(lam.max()) > 0.0:
            return torch.from_numpy(pref)
        lam, vec = lam[keep], vec[:, keep]
        b = (vec * np.sqrt(lam.min() / lam)) @ vec.T
        self.info["rank"] = int(keep.sum())
        return torch.from_numpy(b @ pref)
