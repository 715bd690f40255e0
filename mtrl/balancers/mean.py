"""Plain average of the task gradients (the single-task-style baseline)."""

from __future__ import annotations

import torch
from torch import Tensor

from mtrl.balancers.base import Balancer
from mtrl.balancers.registry import register


@register
class Mean(Balancer):
    """Uniform weights ``1/K``: the gradient of the average task loss.

    Defaults: none. Loss-only (no Jacobian needed): the plumbing runs one backward of the
    mean loss. The loss values are never read (``reads_losses = False``), so nothing is
    copied to the host.
    """

    name = "mean"
    needs_grads = False
    reads_losses = False

    def weights(self, gram: Tensor | None, losses: Tensor | None) -> Tensor:
        k = gram.shape[0] if gram is not None else losses.shape[0]
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
