"""Multi-task vector environment: one Meta-World env per task, torch tensors out.

``make_envs(cfg)`` builds a gymnasium vector env (``SAME_STEP`` autoreset) and wraps it in
``MultiTaskVecEnv``, which hands the learner tensors on ``cfg.device`` with exactly one
host->device transfer per ``step`` (all six outputs are packed into one float32 buffer).

Autoreset: with ``gym.vector.AutoresetMode.SAME_STEP`` a sub-env whose episode ended this
step is reset inside the same ``step`` call; the observation returned for it is the first
observation of the new episode and the real last observation is in ``info["final_obs"]``
(its step info, including ``success``, in ``info["final_info"]``). ``Step.next_obs`` is
rebuilt from those, so a stored transition never pairs the last action of an episode with
the first observation of the next one.
"""

from __future__ import annotations

import contextlib
import signal
import warnings
from collections.abc import Iterator
from functools import partial
from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from mtrl.envs.config import EnvConfig


class Step(NamedTuple):
    """One vector step, tensors on the env's device, row k = task k.

    obs: (K, obs_dim) observation to act on next (first obs of the new episode where one ended).
    next_obs: (K, obs_dim) true observation reached by this step (the final obs where one ended).
    reward: (K,) float32. terminated / truncated / success: (K,) bool.
    """

    obs: Tensor
    next_obs: Tensor
    reward: Tensor
    terminated: Tensor
    truncated: Tensor
    success: Tensor


class HostStep(NamedTuple):
    """Host (numpy) view of the last step; same fields as :class:`Step`.

    On CUDA devices the arrays live in a reused pinned staging buffer and are only valid
    until the next ``step`` / ``reset``; copy them if you keep them.
    """

    obs: np.ndarray
    next_obs: np.ndarray
    reward: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    success: np.ndarray


class MultiTaskVecEnv:
    """A gymnasium vector env with one sub-env per task, speaking torch.

    Attributes: ``task_names`` (list[str], row order), ``num_tasks`` (K), ``obs_dim`` (raw
    Meta-World obs + K one-hot), ``act_dim``, ``device``, ``action_low`` / ``action_high``
    ((act_dim,) float32 tensors on ``device``), ``task_ids`` ((K,) long tensor),
    ``last_host`` (:class:`HostStep` of the last step, numpy, for logging without device syncs).
    """

    def __init__(
        self,
        venv: gym.vector.VectorEnv,
        task_names: list[str],
        device: str | torch.device = "cpu",
        config: EnvConfig | None = None,
    ) -> None:
        if venv.num_envs != len(task_names):
            raise ValueError(
                f"vector env has {venv.num_envs} sub-envs but {len(task_names)} task names"
            )
        mode = venv.metadata.get("autoreset_mode")
        if mode is not None and mode != gym.vector.AutoresetMode.SAME_STEP:
            raise ValueError(f"MultiTaskVecEnv needs autoreset_mode SAME_STEP, got {mode}")
        self.venv = venv
        self.config = config
        self.task_names: list[str] = list(task_names)
        self.num_tasks: int = len(task_names)
        self.obs_dim: int = int(np.prod(venv.single_observation_space.shape))
        act_space = venv.single_action_space
        self.act_dim: int = int(np.prod(act_space.shape))
        self.device = torch.device(device)
        self._low = np.asarray(act_space.low, dtype=np.float32)
        self._high = np.asarray(act_space.high, dtype=np.float32)
        self.action_low = torch.as_tensor(self._low, device=self.device)
        self.action_high = torch.as_tensor(self._high, device=self.device)
        self.task_ids = torch.arange(self.num_tasks, device=self.device)
        self.last_host: HostStep | None = None
        self._pinned = self.device.type == "cuda"
        self._staging: dict[str, tuple[Tensor, np.ndarray, Any]] = {}
        self._needs_reset = True
        self._closed = False

    # ------------------------------------------------------------------ transfer
    def _host_buffer(self, key: str, n: int) -> np.ndarray:
        """A float32 host buffer of n elements to pack into (pinned and reused on CUDA)."""
        if not self._pinned:
            return np.empty(n, dtype=np.float32)  # fresh: returned tensors may alias it
        entry = self._staging.get(key)
        if entry is None:
            pinned = torch.empty(n, dtype=torch.float32).pin_memory()
            entry = (pinned, pinned.numpy(), torch.cuda.Event())
            self._staging[key] = entry
        else:
            entry[2].synchronize()  # previous async copy out of this buffer has finished
        return entry[1]

    def _upload(self, key: str, buf: np.ndarray) -> Tensor:
        """The one host->device transfer."""
        if not self._pinned:
            t = torch.from_numpy(buf)
            return t if self.device.type == "cpu" else t.to(self.device)
        pinned, _, event = self._staging[key]
        out = pinned.to(self.device, non_blocking=True)
        event.record(torch.cuda.current_stream(self.device))
        return out

    # ------------------------------------------------------------------ API
    def reset(self, seed: int | None = None) -> Tensor:
        """Reset every sub-env; returns (K, obs_dim) float32 on ``device``.

        ``seed`` re-seeds every sub-env's RNG (goal drawn per episode, simulator) before the
        reset; the per-task goal sets themselves were fixed by ``EnvConfig.seed``.
        """
        self._check_open()
        if seed is not None:
            self.venv.call("seed", int(seed))
        obs, _ = self.venv.reset()
        k, d = self.num_tasks, self.obs_dim
        buf = self._host_buffer("reset", k * d)
        buf.reshape(k, d)[:] = obs
        self._needs_reset = False
        self.last_host = None
        return self._upload("reset", buf).view(k, d)

    def step(self, actions: Tensor | np.ndarray) -> Step:
        """Step all K sub-envs with ``actions`` (K, act_dim), clipped to the action bounds."""
        self._check_open()
        if self._needs_reset:
            raise RuntimeError("call reset() before the first step()")
        a = self._actions_to_numpy(actions)
        obs, reward, terminated, truncated, info = self.venv.step(a)

        k, d = self.num_tasks, self.obs_dim
        kd = k * d
        buf = self._host_buffer("step", 2 * kd + 4 * k)
        o = buf[:kd].reshape(k, d)
        no = buf[kd : 2 * kd].reshape(k, d)
        tail = buf[2 * kd :].reshape(4, k)
        o[:] = obs
        no[:] = obs
        terminated = np.asarray(terminated, dtype=bool)
        truncated = np.asarray(truncated, dtype=bool)
        done = terminated | truncated
        if done.any():
            final_obs, has_final = info.get("final_obs"), info.get("_final_obs")
            if final_obs is None or not np.array_equal(np.asarray(has_final, bool), done):
                raise RuntimeError(
                    "vector env did not report final observations for the episodes that "
                    "ended; it must use autoreset_mode=SAME_STEP"
                )
            for i in np.flatnonzero(done):
                no[i] = final_obs[i]
        tail[0] = reward
        tail[1] = terminated
        tail[2] = truncated
        tail[3] = _success_from_info(info, k)

        self.last_host = HostStep(o, no, tail[0], tail[1] != 0, tail[2] != 0, tail[3] != 0)
        t = self._upload("step", buf)
        tail_t = t[2 * kd :].view(4, k)
        flags = tail_t[1:] != 0
        return Step(
            obs=t[:kd].view(k, d),
            next_obs=t[kd : 2 * kd].view(k, d),
            reward=tail_t[0],
            terminated=flags[0],
            truncated=flags[1],
            success=flags[2],
        )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.venv.close()

    def __enter__(self) -> MultiTaskVecEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"MultiTaskVecEnv(tasks={self.num_tasks}, obs_dim={self.obs_dim}, "
            f"act_dim={self.act_dim}, device={self.device}, venv={type(self.venv).__name__})"
        )

    # ------------------------------------------------------------------ helpers
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this MultiTaskVecEnv is closed")

    def _actions_to_numpy(self, actions: Tensor | np.ndarray) -> np.ndarray:
        if isinstance(actions, Tensor):
            a = actions.detach().to("cpu", torch.float32).numpy()
        else:
            a = np.asarray(actions, dtype=np.float32)
        if a.shape != (self.num_tasks, self.act_dim):
            raise ValueError(
                f"actions must have shape ({self.num_tasks}, {self.act_dim}), got {tuple(a.shape)}"
            )
        if not np.isfinite(a).all():
            bad = sorted({self.task_names[i] for i in np.argwhere(~np.isfinite(a))[:, 0]})
            raise ValueError(f"non-finite actions for task(s): {', '.join(bad)}")
        return np.clip(a, self._low, self._high)


def _success_from_info(info: dict[str, Any], k: int) -> np.ndarray:
    """Per-env success of this step; ended envs report theirs in ``final_info``."""
    success = np.zeros(k, dtype=bool)
    if "success" in info:
        success |= (np.asarray(info["success"]) != 0) & np.asarray(info["_success"], bool)
    final = info.get("final_info")
    if final is not None and "success" in final:
        sel = np.asarray(final["_success"], bool) & np.asarray(info["_final_info"], bool)
        success[sel] = np.asarray(final["success"])[sel] != 0
    return success


@contextlib.contextmanager
def _metaworld_num_goals(n: int) -> Iterator[None]:
    """Set Meta-World's module-global goal count while building, then restore it.

    Meta-World 3.1 reads ``metaworld._N_GOALS`` when generating goal sets, and its
    ``num_goals`` kwarg overwrites that global permanently.
    """
    import metaworld

    old = metaworld._N_GOALS
    metaworld._N_GOALS = n
    try:
        yield
    finally:
        metaworld._N_GOALS = old


#: Signals that async env workers never act on (see :func:`_workers_ignore_terminal_stops`).
WORKER_BLOCKED_SIGNALS = tuple(
    s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGHUP", None)) if s is not None
)


@contextlib.contextmanager
def _workers_ignore_terminal_stops() -> Iterator[None]:
    """Start worker processes with Ctrl-C (SIGINT) and hangups (SIGHUP) blocked.

    A terminal sends Ctrl-C to the whole foreground process group: the async workers
    died of it (KeyboardInterrupt tracebacks), and the trainer's next ``envs.step``
    failed before it could write its interrupt checkpoint. Workers inherit the signal
    mask of the thread that starts them (fork, and exec for spawn / forkserver), so the
    two signals are blocked in this thread while the workers start and unblocked after:
    in the workers they stay pending for good, while the parent receives any that came in
    the meantime as soon as the mask is restored (a Ctrl-C during the build is not
    lost). SIGTERM is left alone: ``AsyncVectorEnv.close(terminate=True)`` stops workers
    with it (the trainer copes with workers killed by a SIGTERM sent to the whole group).
    """
    if not hasattr(signal, "pthread_sigmask") or not WORKER_BLOCKED_SIGNALS:
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_BLOCKED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _build_vector_env(cfg: EnvConfig, task_names: list[str]) -> gym.vector.VectorEnv:
    import metaworld  # noqa: F401  (registers the Meta-World/* gymnasium ids)

    common: dict[str, Any] = dict(
        max_episode_steps=cfg.max_episode_steps,
        terminate_on_success=cfg.terminate_on_success,
        reward_function_version=cfg.reward_function_version,
        use_one_hot=True,
    )
    with _metaworld_num_goals(cfg.num_goals):
        if cfg.benchmark in ("MT10", "MT50"):
            return gym.make_vec(
                f"Meta-World/{cfg.benchmark}",
                vector_strategy=cfg.vector_strategy,
                autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
                seed=cfg.seed,
                num_goals=cfg.num_goals,
                **common,
            )
        # MT1 / custom: one single-task Meta-World env per task, env i seeded with seed + i
        # (as Meta-World's "Meta-World/custom-mt-envs" does, minus its seed=0 -> unseeded bug).
        k = len(task_names)
        fns = [
            partial(
                metaworld.make_mt_envs,
                name,
                seed=(cfg.seed + i) % 2**32,
                num_tasks=k,
                env_id=i,
                **common,
            )
            for i, name in enumerate(task_names)
        ]
        if cfg.vector_strategy == "async":
            # fork: workers inherit the goal-count setting made above
            return gym.vector.AsyncVectorEnv(
                fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP, context="fork"
            )
        return gym.vector.SyncVectorEnv(fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


def make_envs(cfg: EnvConfig) -> MultiTaskVecEnv:
    """Build the multi-task vector env described by ``cfg`` (see :class:`EnvConfig`).

    ``benchmark="toy"`` returns ``mtrl.envs.toy.ToyMultiTaskEnv`` instead, which follows
    the same reset/step/``Step`` interface.
    """
    if not isinstance(cfg, EnvConfig):
        raise TypeError(f"make_envs expects an EnvConfig, got {type(cfg).__name__}")
    try:
        device = torch.device(cfg.device)
    except RuntimeError as e:
        raise ValueError(f"invalid device {cfg.device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device!r} requested but CUDA is not available; use 'cpu'")

    if cfg.benchmark == "toy":
        from mtrl.envs.toy import ToyMultiTaskEnv

        return ToyMultiTaskEnv(  # type: ignore[return-value]  (same interface, duck-typed)
            max_episode_steps=cfg.max_episode_steps,
            seed=cfg.seed,
            device=device,
            goal_mode=cfg.goal_mode,
            terminate_on_success=cfg.terminate_on_success,
        )

    task_names = cfg.task_names
    with warnings.catch_warnings():
        # the one-hot wrapper builds a float64 Box that gymnasium casts to float32, noisily
        warnings.filterwarnings("ignore", message=".*precision lowered by casting")
        workers = (_workers_ignore_terminal_stops() if cfg.vector_strategy == "async"
                   else contextlib.nullcontext())
        with workers:
            venv = _build_vector_env(cfg, task_names)
    try:
        _check_task_order(venv, task_names)
        return MultiTaskVecEnv(venv, task_names, device, config=cfg)
    except BaseException:
        venv.close()
        raise


def _check_task_order(venv: gym.vector.VectorEnv, task_names: list[str]) -> None:
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    got = list(venv.get_attr("task_name"))
    want = [ALL_V3_ENVIRONMENTS[n].__name__ for n in task_names]
    if got != want:
        raise RuntimeError(f"sub-env order {got} does not match task names {task_names}")
