"""A tiny, fast, fully checkpointable multi-task environment for tests and smoke runs.

Each of K tasks is a point mass in ``[-1, 1]^2`` that must reach its goal. Goals:
``goal_mode="fixed"``, one per task at angle ``2πk/K`` on the circle of radius 0.6;
``"random"``, a new point on that circle drawn at every reset of the task. Observation:
position, goal, task one-hot. Reward: ``-|pos - goal|``; success when the distance is
below 0.1. Episodes end at the time limit (truncation), or at the first success with
``terminate_on_success`` (termination).
It follows the same interface as :class:`mtrl.envs.MultiTaskVecEnv` (reset/step with a
``Step`` of device tensors) and adds ``state_dict()`` / ``load_state_dict()`` so a resumed
run continues the very same episodes, which Meta-World's simulators do not allow.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

TOY_NUM_TASKS = 4
TOY_ACT_DIM = 2


class ToyMultiTaskEnv:
    def __init__(
        self,
        num_tasks: int = TOY_NUM_TASKS,
        max_episode_steps: int = 25,
        seed: int = 0,
        device: str | torch.device = "cpu",
        goal_mode: str = "fixed",
        terminate_on_success: bool = False,
    ) -> None:
        if goal_mode not in ("fixed", "random"):
            raise ValueError(f"goal_mode must be 'fixed' or 'random', got {goal_mode!r}")
        self.num_tasks = num_tasks
        self.act_dim = TOY_ACT_DIM
        self.obs_dim = 2 * TOY_ACT_DIM + num_tasks
        self.task_names = [f"toy-{i}" for i in range(num_tasks)]
        self.max_episode_steps = max_episode_steps
        self.device = torch.device(device)
        self.goal_mode = goal_mode
        self.terminate_on_success = terminate_on_success
        self.action_low = -torch.ones(self.act_dim, device=self.device)
        self.action_high = torch.ones(self.act_dim, device=self.device)
        self._gen = torch.Generator().manual_seed(seed)
        angles = torch.arange(num_tasks, dtype=torch.float32) * (2 * torch.pi / num_tasks)
        self.goals = 0.6 * torch.stack([angles.cos(), angles.sin()], dim=1)
        self._fixed_goals = self.goals.clone()
        self.one_hot = torch.eye(num_tasks)
        self.pos = torch.zeros(num_tasks, self.act_dim)
        self.t = torch.zeros(num_tasks, dtype=torch.long)

    # ------------------------------------------------------------------ gym-like API
    def _obs(self) -> Tensor:
        return torch.cat([self.pos, self.goals, self.one_hot], dim=1)

    def _reset_rows(self, rows: Tensor) -> None:
        noise = 0.1 * (2 * torch.rand(self.num_tasks, self.act_dim, generator=self._gen) - 1)
        self.pos = torch.where(rows[:, None], noise, self.pos)
        self.t = torch.where(rows, torch.zeros_like(self.t), self.t)
        if self.goal_mode == "random":
            angle = 2 * torch.pi * torch.rand(self.num_tasks, generator=self._gen)
            drawn = 0.6 * torch.stack([angle.cos(), angle.sin()], dim=1)
            self.goals = torch.where(rows[:, None], drawn, self.goals)

    def reset(self, seed: int | None = None) -> Tensor:
        if seed is not None:
            self._gen.manual_seed(seed)
        self._reset_rows(torch.ones(self.num_tasks, dtype=torch.bool))
        return self._obs().to(self.device)

    def step(self, actions: Tensor):
        from mtrl.envs import Step

        a = actions.detach().to("cpu", torch.float32).clamp(-1, 1)
        self.pos = (self.pos + 0.1 * a).clamp(-1, 1)
        self.t = self.t + 1
        dist = (self.pos - self.goals).norm(dim=1)
        reward = -dist
        success = dist < 0.1
        next_obs = self._obs()
        truncated = self.t >= self.max_episode_steps
        terminated = success & self.terminate_on_success
        truncated = truncated & ~terminated
        ended = terminated | truncated
        if bool(ended.any()):
            self._reset_rows(ended)
        dev = self.device
        return Step(
            obs=self._obs().to(dev),
            next_obs=next_obs.to(dev),
            reward=reward.to(dev),
            terminated=terminated.to(dev),
            truncated=truncated.to(dev),
            success=success.to(dev),
        )

    def close(self) -> None:
        pass

    def __enter__(self) -> ToyMultiTaskEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        # the episode semantics the run had, so every later resume keeps them
        return {"pos": self.pos.clone(), "t": self.t.clone(), "goals": self.goals.clone(),
                "generator": self._gen.get_state(),
                "goal_mode": torch.tensor(self.goal_mode == "random"),
                "terminate_on_success": torch.tensor(self.terminate_on_success)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pos = state["pos"].to(self.pos.device, copy=True)
        self.t = state["t"].to(self.t.device, copy=True)
        if "goal_mode" in state:  # the semantics the run was trained with
            mode = "random" if bool(state["goal_mode"]) else "fixed"
            terminate = bool(state["terminate_on_success"])
        else:  # from before the toy env had goal modes: fixed goals, time limit only
            mode, terminate = "fixed", False
        if (mode, terminate) != (self.goal_mode, self.terminate_on_success):
            warnings.warn(
                f"toy checkpoint trained with goal_mode={mode!r}, terminate_on_success="
                f"{terminate}: the run keeps them (this env was built with "
                f"{self.goal_mode!r}, {self.terminate_on_success})", stacklevel=2,
            )
        self.goal_mode, self.terminate_on_success = mode, terminate
        saved = state.get("goals", self._fixed_goals)
        self.goals = saved.to(self.goals.device, copy=True)
        self._gen.set_state(state["generator"].cpu())
