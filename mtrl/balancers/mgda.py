"""MGDA: the min-norm element of the convex hull of the task gradients."""

from __future__ import annotations

import torch
from torch import Tensor

from mtrl.balancers._solvers import simplex_qp
from mtrl.balancers.base import Balancer
from mtrl.balancers.registry import register


@register
class MGDA(Balancer):
    """Multiple-gradient descent: direction ``Gᵀw``, ``w = argmin_{w ∈ Δ} |Gᵀw|²``.

    Paper: Désidéri, "Multiple-gradient descent algorithm (MGDA) for multiobjective
    optimization", C. R. Math. 2012; Sener & Koltun, "Multi-Task Learning as
    Multi-Objective Optimization", NeurIPS 2018. Authors' code:
    https://github.com/isl-org/MultiObjectiveOptimization (``MinNormSolver``).

    Defaults: none. Scale: ``Gᵀw`` with w on the simplex (no factor K), as DESIGN.md's
    mean-scale convention requires.

    Deviations from the authors' code: their ``MinNormSolver`` runs Frank-Wolfe for at
    most 250 iterations (stop at change < 1e-5) and optionally normalises the gradients;
    we solve the simplex QP on the Gramian with quadprog (relative ridge 1e-12) plus an
    exact active-set polish, to KKT residual ~1e-13, and never normalise the gradients.
    Degenerate inputs: a zero gradient row (or 0 in the convex hull) gives the zero
    direction, which is the correct min-norm element.
    """

    name = "mgda"
    reads_losses = False  # the weights come from the Gramian alone

    def weights(self, gram: Tensor | None, losses: Tensor | None) -> Tensor:
        return torch.from_numpy(simplex_qp(gram.numpy()))
