"""Per-task evaluation and the two evaluation protocols of DESIGN.md."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mtrl.envs.config import EnvConfig
from mtrl.envs.vec import MultiTaskVecEnv, Step

Policy = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class ProtocolSpec:
    """How evaluation environments differ from training ones, and how long to evaluate."""

    max_episode_steps: int
    goal_mode: str
    episodes_per_task: int


#: ``mtrl``: fixed goal per task, 150-step episodes, 1 deterministic episode per task.
#: ``metaworld-plus``: goals resampled per episode, 500-step episodes, 50 episodes per task.
PROTOCOLS: dict[str, ProtocolSpec] = {
    "mtrl": ProtocolSpec(max_episode_steps=150, goal_mode="fixed", episodes_per_task=1),
    "metaworld-plus": ProtocolSpec(max_episode_steps=500, goal_mode="random", episodes_per_task=50),
}


def get_protocol(protocol: str | ProtocolSpec) -> ProtocolSpec:
    if isinstance(protocol, ProtocolSpec):
        return protocol
    if isinstance(protocol, str) and protocol in PROTOCOLS:
        return PROTOCOLS[protocol]
    raise ValueError(
        f"unknown evaluation protocol {protocol!r}; valid choices: {', '.join(PROTOCOLS)}"
    )


def eval_env_config(train_cfg: EnvConfig, protocol: str | ProtocolSpec) -> EnvConfig:
    """The evaluation-env config for a training config under ``protocol``.

    Same tasks, seed, reward version, device and vector strategy; the protocol sets the
    episode length and the goal mode. So ``fixed`` evaluation goals are a ``fixed``-goal
    run's training goals, and ``random`` evaluation goals come from a ``random``-goal run's
    own per-task goal sets; across modes they are unrelated (a ``fixed``-goal run's goal is
    in general not among the ``random`` evaluation goals). Episodes never terminate on success
    (success is measured over the whole episode).
    """
    spec = get_protocol(protocol)
    return dataclasses.replace(
        train_cfg,
        max_episode_steps=spec.max_episode_steps,
        goal_mode=spec.goal_mode,
        terminate_on_success=False,
    )


def eval_seed(seed: int, step: int) -> int:
    """The reset seed of the evaluation at training step ``step`` of a run seeded ``seed``.

    Training and ``mtrl eval`` both use it, so an evaluation depends only on the policy,
    the run's seed and the step: not on how many evaluations came before in the process
    (a resumed run evaluates like an uninterrupted one, and ``mtrl eval`` of a checkpoint
    repeats the run's own evaluation at that step). Different steps get different seeds
    (random goals differ between evaluations).
    """
    return int(np.random.SeedSequence([int(seed), int(step), 0x6D74726C]).generate_state(1)[0])


@dataclass(frozen=True)
class EvalResult:
    """Outcome of :func:`evaluate`.

    success_rate / mean_return: task name -> value. success_rate_tensor / mean_return_tensor:
    the same as (K,) float32 CPU tensors in task order. mean_success: mean over tasks.
    episode_success / episode_return: (K, episodes_per_task) numpy arrays, per episode.
    """

    task_names: list[str]
    success_rate: dict[str, float]
    mean_return: dict[str, float]
    success_rate_tensor: Tensor
    mean_return_tensor: Tensor
    mean_success: float
    episodes_per_task: int
    episode_success: np.ndarray
    episode_return: np.ndarray
    env_steps: int


def _host_view(envs: MultiTaskVecEnv, step: Step) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(reward, success, done) of this step as numpy, without a device round trip if possible.

    ``MultiTaskVecEnv`` keeps a host copy in ``last_host``; any other env that follows the
    same ``Step`` contract (e.g. a test double) is read back from its tensors.
    """
    host = getattr(envs, "last_host", None)
    if host is not None:
        return host.reward, host.success, host.terminated | host.truncated
    done = (step.terminated | step.truncated).cpu().numpy()
    return step.reward.float().cpu().numpy(), step.success.cpu().numpy(), done


def evaluate(
    policy: Policy,
    envs: MultiTaskVecEnv,
    episodes_per_task: int,
    seed: int | None = None,
    on_step: Callable[[], None] | None = None,
) -> EvalResult:
    """Run ``policy`` until every task has finished ``episodes_per_task`` episodes.

    ``policy(obs (K, obs_dim)) -> actions (K, act_dim)`` is called under ``torch.no_grad``
    and should be deterministic. The envs are reset first (re-seeded with ``seed`` if
    given); extra episodes of tasks that finish early are ignored. An episode succeeds if
    ``info["success"]`` was true at ANY of its steps. Use a dedicated evaluation env
    (``make_envs(eval_env_config(train_cfg, protocol))``): this leaves it mid-episode.
    ``on_step`` (e.g. a progress bar's update) is called after each vector-env step;
    episodes that run to their time limit take ``episodes_per_task × max_episode_steps``
    of them.
    """
    if (
        isinstance(episodes_per_task, bool)
        or not isinstance(episodes_per_task, int)
        or (episodes_per_task < 1)
    ):
        raise ValueError(f"episodes_per_task must be an integer >= 1; got {episodes_per_task!r}")
    k, n = envs.num_tasks, episodes_per_task
    ep_success = np.zeros((k, n), dtype=bool)
    ep_return = np.zeros((k, n), dtype=np.float64)
    finished = np.zeros(k, dtype=np.int64)
    run_return = np.zeros(k, dtype=np.float64)
    run_success = np.zeros(k, dtype=bool)
    steps = 0

    obs = envs.reset(seed=seed)
    while (finished < n).any():
        with torch.no_grad():
            actions = policy(obs)
        step = envs.step(actions)
        steps += 1
        reward, success, done = _host_view(envs, step)
        run_return += reward
        run_success |= success
        for i in np.flatnonzero(done):
            if finished[i] < n:
                ep_success[i, finished[i]] = run_success[i]
                ep_return[i, finished[i]] = run_return[i]
                finished[i] += 1
            run_return[i] = 0.0
            run_success[i] = False
        obs = step.obs
        if on_step is not None:
            on_step()

    rates = ep_success.mean(axis=1)
    returns = ep_return.mean(axis=1)
    names = list(envs.task_names)
    return EvalResult(
        task_names=names,
        success_rate={t: float(r) for t, r in zip(names, rates, strict=True)},
        mean_return={t: float(r) for t, r in zip(names, returns, strict=True)},
        success_rate_tensor=torch.as_tensor(rates, dtype=torch.float32),
        mean_return_tensor=torch.as_tensor(returns, dtype=torch.float32),
        mean_success=float(rates.mean()),
        episodes_per_task=n,
        episode_success=ep_success,
        episode_return=ep_return,
        env_steps=steps * k,
    )
