"""Meta-World's scripted expert policies as a multi-task policy over our observations."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from mtrl.envs.config import resolve_task_name


def expert_policy(task_names: Sequence[str]) -> Callable[[Tensor], Tensor]:
    """Policy ``obs (K, obs_dim) -> actions (K, 4)`` running task k's scripted expert on row k.

    The trailing K-dim task one-hot is stripped before the expert sees the observation.
    Actions come back as float32 on the observations' device. Uses
    ``metaworld.policies.ENV_POLICY_MAP`` (task name -> ``Sawyer...V3Policy`` class).
    """
    from metaworld.policies import ENV_POLICY_MAP

    names = [resolve_task_name(t) for t in task_names]
    missing = [t for t in names if t not in ENV_POLICY_MAP]
    if missing:
        raise ValueError(f"no scripted expert for: {', '.join(missing)}")
    experts = [ENV_POLICY_MAP[t]() for t in names]
    k = len(experts)

    def policy(obs: Tensor) -> Tensor:
        if obs.ndim != 2 or obs.shape[0] != k:
            raise ValueError(
                f"expected observations of shape ({k}, obs_dim), got {tuple(obs.shape)}"
            )
        raw = obs[:, : obs.shape[1] - k].detach().to("cpu", torch.float64).numpy()
        with warnings.catch_warnings():
            # the experts' proportional controllers warn when they saturate; the env clips
            warnings.simplefilter("ignore")
            actions = np.stack([e.get_action(raw[i]) for i, e in enumerate(experts)])
        return torch.as_tensor(actions, dtype=torch.float32).to(obs.device)

    return policy
