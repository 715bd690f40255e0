"""Environment configuration: one frozen dataclass, validated on construction.

Every user-reachable mistake (unknown benchmark, unknown task, bad episode length, unknown
vector strategy / goal mode / reward version, async without ``fork``) raises ONE
``ValueError`` that names the valid choices.
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass

BENCHMARKS: tuple[str, ...] = ("MT10", "MT50", "MT1", "custom", "toy")
VECTOR_STRATEGIES: tuple[str, ...] = ("sync", "async")
GOAL_MODES: tuple[str, ...] = ("random", "fixed")
REWARD_VERSIONS: tuple[str, ...] = ("v1", "v2")

#: Meta-World v3 environments truncate themselves at this horizon (``max_path_length``)
#: and refuse to step further, so longer episodes cannot exist.
MAX_PATH_LENGTH = 500

#: Number of goals pre-generated per task in ``goal_mode="random"`` (Meta-World+ default).
NUM_RANDOM_GOALS = 50

#: Dimension of a raw Meta-World v3 observation (before the task one-hot).
RAW_OBS_DIM = 39


def all_task_names() -> list[str]:
    """The 50 Meta-World v3 task names, in MT50 order (e.g. ``"reach-v3"``)."""
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    return list(ALL_V3_ENVIRONMENTS.keys())


def benchmark_task_names(benchmark: str) -> list[str]:
    """Ordered task names of a fixed benchmark (``"MT10"`` or ``"MT50"``)."""
    from metaworld.env_dict import MT10_V3, MT50_V3

    if benchmark == "MT10":
        return list(MT10_V3.keys())
    if benchmark == "MT50":
        return list(MT50_V3.keys())
    raise ValueError(f"benchmark {benchmark!r} has no fixed task list; choose 'MT10' or 'MT50'")


def _choice(field: str, value: object, choices: tuple[str, ...]) -> str:
    """Match ``value`` against ``choices`` case-insensitively; return the canonical spelling."""
    if isinstance(value, str):
        for c in choices:
            if value.lower() == c.lower():
                return c
    raise ValueError(f"unknown {field} {value!r}; valid choices: {', '.join(choices)}")


def resolve_task_name(name: object) -> str:
    """Canonical Meta-World v3 task name; ``"reach"`` is accepted for ``"reach-v3"``."""
    valid = all_task_names()
    if isinstance(name, str):
        key = name.strip().lower()
        if key in valid:
            return key
        if f"{key}-v3" in valid:
            return f"{key}-v3"
    raise ValueError(f"unknown Meta-World task {name!r}; valid task names: {', '.join(valid)}")


def fork_available() -> bool:
    return "fork" in multiprocessing.get_all_start_methods()


@dataclass(frozen=True)
class EnvConfig:
    """How to build the multi-task training (or evaluation) environments.

    One environment per task; the task one-hot is appended to the observation (MT10:
    39 + 10 = 49 dims). Same seed -> identical transitions for identical actions.
    """

    benchmark: str = "MT10"
    """'MT10', 'MT50', 'MT1' (+ task), 'custom' (+ tasks), 'toy' (no Meta-World: tests)."""
    task: str | None = None
    """The one Meta-World task of 'MT1' (e.g. reach-v3)."""
    tasks: tuple[str, ...] | None = None
    """The Meta-World tasks of 'custom'."""
    seed: int = 0
    """Seeds goals (sets and sampling), simulator, networks, buffer sampling, warm-up actions."""
    vector_strategy: str = "sync"
    """'sync' (in-process) or 'async' (one forked worker per task)."""
    max_episode_steps: int = 500
    """Time limit, 1..500 (the mtrl protocol uses 150); reaching it is truncation."""
    goal_mode: str = "random"
    """'random': a goal drawn on every reset from 50 seeded goals per task (Meta-World+);
    'fixed': one goal per task for the whole run (the mtrl protocol)."""
    reward_function_version: str = "v2"
    """Meta-World reward version, 'v2' or 'v1'."""
    device: str = "cpu"
    """Torch device the learner wants tensors on (set by the trainer from --device)."""
    terminate_on_success: bool = False
    """End an episode at its first success (off: success is measured, not absorbing)."""

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        put("benchmark", _choice("benchmark", self.benchmark, BENCHMARKS))
        put("vector_strategy", _choice("vector_strategy", self.vector_strategy, VECTOR_STRATEGIES))
        put("goal_mode", _choice("goal_mode", self.goal_mode, GOAL_MODES))
        put(
            "reward_function_version",
            _choice("reward_function_version", self.reward_function_version, REWARD_VERSIONS),
        )

        if self.benchmark == "MT1":
            if self.task is None:
                raise ValueError(
                    "benchmark 'MT1' needs `task` (one Meta-World task name, e.g. 'reach-v3')"
                )
            if self.tasks is not None:
                raise ValueError("benchmark 'MT1' takes `task`, not `tasks`; use 'custom'")
            put("task", resolve_task_name(self.task))
        elif self.benchmark == "custom":
            if self.task is not None:
                raise ValueError("benchmark 'custom' takes `tasks` (a list), not `task`")
            if self.tasks is None or isinstance(self.tasks, str) or len(self.tasks) == 0:
                raise ValueError(
                    "benchmark 'custom' needs `tasks`: a non-empty list of Meta-World task "
                    f"names; valid task names: {', '.join(all_task_names())}"
                )
            names = tuple(resolve_task_name(t) for t in self.tasks)
            dupes = sorted({t for t in names if names.count(t) > 1})
            if dupes:
                raise ValueError(f"`tasks` lists a task more than once: {', '.join(dupes)}")
            put("tasks", names)
        elif self.task is not None or self.tasks is not None:
            raise ValueError(
                f"benchmark {self.benchmark!r} has a fixed task list; `task` is only used "
                "with 'MT1' and `tasks` only with 'custom'"
            )

        steps = self.max_episode_steps
        if (
            isinstance(steps, bool)
            or not isinstance(steps, int)
            or not (1 <= steps <= MAX_PATH_LENGTH)
        ):
            raise ValueError(
                f"max_episode_steps must be an integer in 1..{MAX_PATH_LENGTH} "
                f"(Meta-World v3 episodes end at {MAX_PATH_LENGTH} steps); got {steps!r}"
            )
        if (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not (0 <= self.seed < 2**32)
        ):
            raise ValueError(f"seed must be an integer in 0..2**32-1; got {self.seed!r}")
        if self.vector_strategy == "async" and not fork_available():
            methods = ", ".join(multiprocessing.get_all_start_methods())
            raise ValueError(
                "vector_strategy 'async' needs the 'fork' multiprocessing start method, which "
                f"this platform lacks (available: {methods}); valid choices here: sync"
            )
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(
                f"device must be a torch device string such as 'cpu' or 'cuda'; got {self.device!r}"
            )

    @property
    def task_names(self) -> list[str]:
        """Ordered task names this config builds (one environment per task)."""
        if self.benchmark == "MT1":
            assert self.task is not None
            return [self.task]
        if self.benchmark == "custom":
            assert self.tasks is not None
            return list(self.tasks)
        if self.benchmark == "toy":
            from mtrl.envs.toy import TOY_NUM_TASKS

            return [f"toy-{i}" for i in range(TOY_NUM_TASKS)]
        return benchmark_task_names(self.benchmark)

    @property
    def num_goals(self) -> int:
        return 1 if self.goal_mode == "fixed" else NUM_RANDOM_GOALS
