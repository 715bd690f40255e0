"""Run configuration: frozen dataclasses, flat JSON presets, strict validation.

A preset in ``configs/`` is a JSON object whose keys mirror :class:`TrainConfig` (nested
objects for ``env`` and ``sac``). Unknown keys are an error that names the key and the
valid choices; command-line overrides are applied on top by the CLI.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mtrl.agents.sac import SACConfig
from mtrl.envs import EnvConfig


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key and the valid choices."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs. Steps count vector-env steps: one transition per task."""

    env: EnvConfig = field(
        default_factory=lambda: EnvConfig(max_episode_steps=150, goal_mode="fixed")
    )
    """Environment: benchmark (MT10, MT50, MT1, custom, toy), seed, episode length, goals.
    Default: MT10 with the mtrl protocol's episodes (150 steps, one fixed goal per task);
    with --protocol metaworld-plus also set --env.max-episode-steps 500 --env.goal-mode
    random (the presets and `mtrl bench` do)."""
    sac: SACConfig = field(default_factory=SACConfig)
    """Multi-task SAC: network sizes, learning rates, which losses are balanced."""
    balancer: str = "mean"
    """Balancer name (see `mtrl balancers`) or a 'package.module:Class' path."""
    balancer_kwargs: dict[str, int | float | bool | str] = field(default_factory=dict)
    """Balancer hyper-parameters (c 0.9 for cagrad), merged into a --config preset's."""
    total_steps: int = 1_000_000
    """Vector-env steps to train (each adds one transition per task)."""
    warmup_steps: int = 1_500
    """Vector-env steps of uniformly random actions before the policy acts and updates start."""
    updates_per_step: int = 1
    """Gradient updates per vector-env step (update-to-data ratio)."""
    batch_size: int = 1280
    """Transitions per update (all tasks together; 128 per task on MT10)."""
    stratified: bool = True
    """Sample batch_size / K transitions per task (False: uniform over the buffer)."""
    buffer_capacity: int = 1_000_000
    """Replay capacity over all tasks (split evenly between tasks)."""
    protocol: Literal["mtrl", "metaworld-plus"] = "mtrl"
    """Evaluation protocol (see DESIGN.md)."""
    eval_every: int = 10_000
    """Evaluate every N vector-env steps (and at the end); 0 disables periodic evaluation."""
    eval_episodes: int | None = None
    """Episodes per task at each evaluation (default: the protocol's)."""
    log_every: int = 1_000
    """Write metrics every N vector-env steps."""
    checkpoint_every: int = 50_000
    """Checkpoint every N vector-env steps (and at the end)."""
    save_buffer: bool = True
    """Include the replay buffer in checkpoints (exact resume; costs disk)."""
    max_consecutive_skips: int = 100
    """Stop the run after this many consecutive updates skipped for NaN/Inf."""
    device: str = "auto"
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda', 'cuda:1', ..."""
    threads: int = 1
    """torch CPU threads (oversubscription is very costly on small machines)."""
    run_dir: str | None = None
    """Output directory (default: runs/<benchmark>-<balancer>-s<seed>)."""
    progress: bool = True
    """Show a progress bar."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, recursing into nested dataclasses.

    Unknown keys and values of the wrong JSON type (``"false"`` for a bool, ``"3e-4"``
    for a number, ``400`` for a list) raise :class:`ConfigError` naming the key; integers
    are accepted for float fields and lists for tuple fields.
    """
    if not isinstance(data, Mapping):
        section = prefix.rstrip(".") or "<root>"
        raise ConfigError(f"config section {section!r} must be an object, got {data!r}")
    hints = _field_types(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        where = f" in section {prefix.rstrip('.')!r}" if prefix else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}{where}; "
            f"valid keys: {', '.join(hints)}"
        )
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if isinstance(value, Mapping):  # keys not given keep the field's own default
                # (TrainConfig's env default is not EnvConfig())
                fld = next(f for f in dataclasses.fields(cls) if f.name == key)
                if fld.default_factory is not dataclasses.MISSING:
                    value = {**dataclasses.asdict(fld.default_factory()), **value}
            kwargs[key] = from_dict(tp, value, prefix=f"{prefix}{key}.")
            continue
        if key == "balancer_kwargs":
            # the values are the balancer's to check (build() names the bad one); any
            # JSON value may be valid for a plug-in (None for a seed, a list, ...)
            if not (isinstance(value, Mapping) and all(isinstance(k, str) for k in value)):
                raise ConfigError(
                    f"{prefix}{key} must be an object (hyper-parameter names to values), "
                    f"got {value!r}"
                )
            kwargs[key] = dict(value)
            continue
        if not _matches(value, tp):
            raise ConfigError(f"{prefix}{key} must be {_describe(tp)}, got {value!r}")
        try:
            kwargs[key] = _convert(value, tp)
        except OverflowError as exc:  # e.g. a 400-digit integer for a float
            raise ConfigError(f"{prefix}{key} is too large: {value!r}") from exc
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # __post_init__ checks of the dataclass
        where = f" in section {prefix.rstrip('.')!r}" if prefix else ""
        raise ConfigError(f"invalid config{where}: {exc}") from exc


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _matches(value: Any, tp: Any) -> bool:
    """Whether a JSON value fits the field type ``tp`` (the types configs use)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if _is_union(tp):
        return any(_matches(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(
            _matches(v, a) for v, a in zip(value, args, strict=True)
        )
    if origin is dict:
        key_tp, value_tp = args
        return isinstance(value, Mapping) and all(
            _matches(k, key_tp) and _matches(v, value_tp) for k, v in value.items()
        )
    return True  # another type: left to the dataclass's own checks


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if _is_union(tp):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in args)
    simple = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if tp in simple:
        return simple[tp]
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list (each {_describe(args[0])})"
        return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})"
    if origin is dict:
        return f"an object (names to {_describe(args[1])})"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any) -> Any:
    """A matching JSON value as the field wants it: lists to tuples, ints to floats."""
    if value is None:
        return None
    if _is_union(tp):
        # the first member that matches (unions here are X | None or number-like kwargs)
        tp = next(a for a in typing.get_args(tp) if _matches(value, a))
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is float:
        return float(value)
    if origin is tuple:
        each = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        return tuple(_convert(v, a) for v, a in zip(value, each, strict=True))
    if origin is dict:
        return dict(value)
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-ready dict of a (nested) config dataclass."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _readable(p: Path) -> bool:
    """A file to read a preset from: a regular file, or a pipe such as bash's
    ``--config <(jq ... preset.json)`` (``/dev/fd/N``); not a directory (an earlier
    ``--run-dir mt10_cagrad`` is not the preset ``mt10_cagrad``)."""
    return p.exists() and not p.is_dir()


def load_preset(path: str | Path) -> TrainConfig:
    """Load a JSON preset. A bare name such as ``mt10_cagrad`` is looked up in ``configs/``."""
    p = Path(path)
    if not _readable(p) and not p.suffix:
        p = p.with_suffix(".json")
    if not _readable(p):
        candidate = Path(__file__).resolve().parent.parent / "configs" / p.name
        if candidate.is_file():
            p = candidate
    if not _readable(p):
        if Path(path).is_dir():
            raise ConfigError(f"config file {str(path)!r} is a directory; --config takes a "
                              "JSON file or a preset name")
        presets = sorted(x.stem for x in presets_dir().glob("*.json"))
        raise ConfigError(f"config file {str(path)!r} not found; presets: {', '.join(presets)}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid JSON: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(p)!r} is not text (UTF-8 JSON): {exc}") from exc
    if isinstance(data, dict) and "task_names" in data:
        # a run's config.json as a preset: its settings, not that run's task record or
        # its directory (a new run goes to its own folder)
        data.pop("task_names")
        data.pop("run_dir", None)
    return from_dict(TrainConfig, data)


def read_run_config(path: str | Path) -> tuple[TrainConfig, dict[str, Any]]:
    """A run's ``config.json``: the config and the raw JSON (with ``task_names``).

    A missing or unreadable file raises :class:`ConfigError` naming it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{str(p)!r} not found (is {str(p.parent)!r} a run directory?)")
    try:
        raw = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"run config {str(p)!r} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"run config {str(p)!r} must hold a JSON object")
    data = {k: v for k, v in raw.items() if k != "task_names"}
    try:
        return from_dict(TrainConfig, data), raw
    except ConfigError as exc:
        raise ConfigError(f"run config {str(p)!r}: {exc}") from exc


#: Settings a resumed run may change: they affect how long it runs, how it logs, evaluates
#: and checkpoints and where it computes, not what is trained.
RESUME_MAY_CHANGE = (
    "total_steps", "log_every", "eval_every", "eval_episodes", "checkpoint_every",
    "save_buffer", "max_consecutive_skips", "device", "env.device", "threads", "progress",
    "run_dir",
)  # (env.device is replaced by the resolved --device when the envs are built)


def resume_changes(saved: Mapping[str, Any], cfg: TrainConfig) -> list[str]:
    """``"key: old -> new"`` for each setting of ``cfg`` that differs from the run's saved
    config (``config.json`` contents) and may not change on resume."""

    def flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, Mapping) and k != "balancer_kwargs":
                out |= flat(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = v
        return out

    old = flat({k: v for k, v in saved.items() if k != "task_names"})
    new = flat(to_dict(cfg))
    return [
        f"{key}: {json.dumps(old.get(key))} -> {json.dumps(new.get(key))}"
        for key in sorted(set(old) | set(new))
        if key not in RESUME_MAY_CHANGE and old.get(key) != new.get(key)
    ]


#: What a run writes into its directory besides its checkpoint and ``config.json``
#: (``tb`` is TensorBoard's directory). A fresh ``mtrl train`` refuses a directory that
#: holds any of them; ``mtrl bench`` removes them before restarting such a run.
RUN_LOGS = ("metrics.jsonl", "eval.jsonl", "result.json", "tb")


def presets_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "configs"


def _positive(name: str, value: Any, allow_zero: bool = False) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and (
        value >= 0 if allow_zero else value >= 1
    )
    if not ok:
        bound = ">= 0" if allow_zero else ">= 1"
        raise ConfigError(f"{name} must be an integer {bound}, got {value!r}")


#: Most torch threads per usable CPU core accepted (``threads``).
MAX_THREADS_PER_CORE = 4
#: Most gradient updates per vector-env step accepted (``updates_per_step``; published
#: update-to-data ratios go to ~20).
MAX_UPDATES_PER_STEP = 1000


def _usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def default_balance(balancer: str, balancer_kwargs: Mapping[str, Any] | None = None
                    ) -> tuple[str, ...]:
    """The losses a run with ``balancer`` balances unless told otherwise: the critic,
    actor and temperature losses (the published multi-task setups), or only those that
    cannot be negative (the critic) for a balancer that needs non-negative losses (FAMO,
    whose presets balance the critic only). An unknown balancer or bad kwargs get the
    general default (:func:`validate` reports them)."""
    from mtrl.agents.sac import NONNEGATIVE_LOSSES
    from mtrl.balancers import build

    general = SACConfig().balance
    try:
        nonnegative = build(balancer, **dict(balancer_kwargs or {})).needs_nonnegative_losses
    except Exception:  # noqa: BLE001 - validate() names the problem
        return general
    return tuple(x for x in general if x in NONNEGATIVE_LOSSES) if nonnegative else general


def validate(cfg: TrainConfig, num_tasks: int | None = None) -> None:
    """Check values that the dataclasses cannot check by type; raise ConfigError."""
    from mtrl.balancers import build

    for name in ("total_steps", "updates_per_step", "batch_size", "buffer_capacity",
                 "log_every", "checkpoint_every", "max_consecutive_skips", "threads"):
        _positive(name, getattr(cfg, name))
    for name in ("warmup_steps", "eval_every"):
        _positive(name, getattr(cfg, name), allow_zero=True)
    cores = _usable_cores()
    if cfg.threads > MAX_THREADS_PER_CORE * cores:
        # (100,000 threads crashed the process without a word; 10,000 crawled)
        raise ConfigError(
            f"threads {cfg.threads} is more than {MAX_THREADS_PER_CORE} per usable core "
            f"({cores} here): at most {MAX_THREADS_PER_CORE * cores}; the cores are the "
            "useful number"
        )
    if cfg.updates_per_step > MAX_UPDATES_PER_STEP:
        # (a stop signal takes effect after the current step's updates: 1e9 of them
        # ignored it for good)
        raise ConfigError(
            f"updates_per_step {cfg.updates_per_step} is above {MAX_UPDATES_PER_STEP} (a "
            "stop signal waits for the current step's updates)"
        )
    if cfg.batch_size > cfg.buffer_capacity:
        raise ConfigError(
            f"batch_size {cfg.batch_size} exceeds buffer_capacity {cfg.buffer_capacity}: every "
            "batch would repeat transitions; lower --batch-size or raise --buffer-capacity"
        )
    if cfg.eval_episodes is not None:
        _positive("eval_episodes", cfg.eval_episodes)
    if cfg.protocol not in ("mtrl", "metaworld-plus"):
        raise ConfigError(f"protocol must be one of mtrl, metaworld-plus; got {cfg.protocol!r}")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", cfg.device):
        raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps; got {cfg.device!r}")
    valid_losses = ("critic", "actor", "alpha")
    bad = [x for x in cfg.sac.balance if x not in valid_losses]
    if bad:
        raise ConfigError(
            f"sac.balance has unknown loss(es) {', '.join(bad)}; valid: {', '.join(valid_losses)}"
        )
    try:
        balancer = build(cfg.balancer, **cfg.balancer_kwargs)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    from mtrl.agents.sac import NONNEGATIVE_LOSSES

    signed = [x for x in cfg.sac.balance if x not in NONNEGATIVE_LOSSES]
    if balancer.needs_nonnegative_losses and signed:
        raise ConfigError(
            f"balancer {cfg.balancer!r} needs non-negative task losses, but sac.balance includes "
            f"{', '.join(signed)} (can be negative); set sac.balance to "
            f"{list(NONNEGATIVE_LOSSES)} (the famo presets do)"
        )
    if cfg.sac.balance and not cfg.stratified:
        raise ConfigError(
            "stratified=False (uniform sampling) gives no task-major batch to balance per-task "
            "losses on; use stratified=True, or set sac.balance=[] to train on the plain "
            "batch mean (the original mtrl setting)"
        )
    if num_tasks is not None:
        if cfg.stratified and cfg.batch_size % num_tasks:
            below = cfg.batch_size // num_tasks * num_tasks
            near = " or ".join(str(b) for b in (below, below + num_tasks) if b > 0)
            raise ConfigError(
                f"batch_size {cfg.batch_size} must be divisible by the {num_tasks} tasks "
                f"for stratified sampling (the nearest that are: {near})"
            )
        if cfg.buffer_capacity < num_tasks:
            raise ConfigError(f"buffer_capacity must be at least the {num_tasks} tasks")
