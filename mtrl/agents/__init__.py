"""Multi-task SAC agent: networks, per-task losses, balanced updates."""

from mtrl.agents.networks import (
    SquashedGaussianActor,
    TwinCritic,
    mlp,
    tanh_gaussian_log_prob,
)
from mtrl.agents.sac import LOSS_NAMES, MultiTaskSAC, SACConfig

__all__ = [
    "LOSS_NAMES",
    "MultiTaskSAC",
    "SACConfig",
    "SquashedGaussianActor",
    "TwinCritic",
    "mlp",
    "tanh_gaussian_log_prob",
]
