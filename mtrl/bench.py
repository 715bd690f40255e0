"""Benchmarks: every (balancer, seed) pair as an ordinary training run, then the report.

    mtrl bench --benchmark MT10 --balancers mean,cagrad,fairgrad,sdmgrad-os --seeds 5 \\
        --steps 200000 --protocol mtrl --out benchmarks/mt10

Layout: ``OUT/runs/<balancer>/seed<k>/`` is a normal run directory (``config.json``,
``metrics.jsonl``, ``eval.jsonl``, ``checkpoint.pt``, ``result.json``) plus
``bench_config.json`` (the config the bench asked for) and ``train.log`` (the run's
stdout/stderr). ``OUT/bench.json`` records the invocation and each run's outcome; the
report (``results.csv``, ``summary.md``, plots) is written to ``OUT``.

Each run is a subprocess ``python -m mtrl.cli train --config RUN/bench_config.json
[--resume RUN]`` so that a crash cannot take down the bench. Rerunning the same command
skips finished runs (``result.json``), resumes interrupted ones (``checkpoint.pt`` without
``result.json``) and starts the rest.

Launchers: ``local`` runs ``max(1, cpus // threads_per_run)`` runs at a time (fewer when
they share GPUs: ``1 / gpus_per_run`` runs per GPU); ``ray`` submits each run as a Ray task
with ``num_cpus=threads_per_run`` and ``num_gpus=gpus_per_run`` on a local or remote
cluster. With Ray on several nodes, OUT must be on a filesystem every node sees (NFS, a
shared volume): runs write there directly and the driver reads the results from there.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mtrl.checkpoint import atomic_write_json, atomic_write_text, read_json_object
from mtrl.config import (
    RESUME_MAY_CHANGE,
    RUN_LOGS,
    ConfigError,
    TrainConfig,
    default_balance,
    from_dict,
    presets_dir,
    to_dict,
    validate,
)
from mtrl.progress import Progress
from mtrl.runtime import (
    RunDirBusy,
    install_stop_handlers,
    on_hangup,
    restore_handlers,
    run_dir_lock,
)

LAUNCHERS = ("local", "ray")
PROTOCOL_TRAIN_ENV = {
    # The protocol decides the training env's episode length and goal mode.
    "mtrl": {"max_episode_steps": 150, "goal_mode": "fixed"},
    "metaworld-plus": {"max_episode_steps": 500, "goal_mode": "random"},
}
#: The smallest GPU share of a run: the local launcher runs ``1 / gpus_per_run`` per GPU.
MIN_GPUS_PER_RUN = 0.01
#: Keys the bench sets itself; ``--set`` may not override them (use the named option).
BENCH_OWNED = {
    "env.benchmark": "--benchmark",
    "env.seed": "--seeds",
    "total_steps": "--steps",
    "protocol": "--protocol",
    "balancer": "--balancers",
    "run_dir": "--out",
    "threads": "--threads-per-run",
}
#: Config keys that may differ between invocations of the same bench without making an
#: existing run a different experiment: what a resume may change (``--steps`` may grow:
#: the runs are extended; see plan_runs).
RUNTIME_KEYS = tuple(k for k in RESUME_MAY_CHANGE if "." not in k)
BENCH_CONFIG = "bench_config.json"
LOG_NAME = "train.log"
#: Written into a run directory by the Ray launcher to ask the run there to checkpoint and
#: stop (``ray.cancel`` does not reliably reach a task that waits on its subprocess).
STOP_NAME = ".bench-stop"
#: A run's files besides its checkpoint; removed before a run that has no checkpoint
#: starts again (``mtrl train`` refuses a directory holding its logs).
STALE_FILES = ("config.json", *RUN_LOGS)
ERROR_TAIL_LINES = 15


# ====================================================================== specification
@dataclass(frozen=True)
class BenchSpec:
    """A benchmark invocation: which runs, where, and how to launch them."""

    benchmark: str
    balancers: tuple[str, ...]
    seeds: int
    steps: int
    protocol: str = "mtrl"
    out: Path = Path("benchmarks/bench")
    launcher: str = "local"
    address: str | None = None
    workers: int | None = None
    threads_per_run: int = 1
    gpus_per_run: float = 0.25
    overrides: tuple[str, ...] = ()
    report: bool = True
    reps: int = 10_000
    poi_reps: int = 1_000


@dataclass(frozen=True)
class RunPlan:
    balancer: str
    seed: int
    run_dir: Path
    config: dict[str, Any]  # to_dict(TrainConfig) as the bench wants it
    state: str  # "done" | "resume" | "new"


def _canonical(name: str, choices: Sequence[str], what: str) -> str:
    for c in choices:
        if name.lower() == c.lower():
            return c
    raise ConfigError(f"unknown {what} {name!r}; valid choices: {', '.join(choices)}")


def parse_balancers(text: str | Sequence[str]) -> tuple[str, ...]:
    from mtrl.balancers import names

    items = text.split(",") if isinstance(text, str) else list(text)
    items = [x.strip() for x in items if x.strip()]
    if not items:
        raise ConfigError("--balancers needs at least one balancer name")
    valid = names()
    bad = [x for x in items if x not in valid]
    if bad:
        hint = ""
        if any(":" in x for x in bad):  # runs are folders named after the balancer
            hint = ("; bench takes registered names only: register a 'module:Class' "
                    "balancer under the entry-point group mtrl.balancers (README, "
                    "'Writing a balancer') to benchmark it")
        raise ConfigError(
            f"unknown balancer(s) {', '.join(bad)}; valid: {', '.join(valid)}{hint}")
    dupes = sorted({x for x in items if items.count(x) > 1})
    if dupes:
        raise ConfigError(f"--balancers lists {', '.join(dupes)} more than once")
    return tuple(items)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["sac.hidden_sizes=[32,32]", "env.benchmark=toy"]`` -> nested dict.

    Values are JSON (``100``, ``true``, ``[32, 32]``, ``{"c": 0.4}``, ``null``); anything
    that is not valid JSON is taken as a string, so ``env.benchmark=toy`` works unquoted.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE (e.g. warmup_steps=100), got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part!r} is already set to a value")
            node = child
        node[parts[-1]] = value
    for owned, option in BENCH_OWNED.items():  # (dotted, or inside an object: env={...})
        found: Any = out
        for part in owned.split("."):
            if not isinstance(found, dict) or part not in found:
                break
            found = found[part]
        else:
            raise ConfigError(f"--set {owned}=... is set by the bench; use {option}")
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: nested objects merge, everything else (lists too) replaces.

    ``balancer_kwargs`` is replaced as a whole only by the preset; an override adds keys.
    """
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def preset_path(benchmark: str, balancer: str) -> Path:
    return presets_dir() / f"{benchmark.lower()}_{balancer.replace('-', '_')}.json"


def run_config(
    benchmark: str,
    balancer: str,
    seed: int,
    steps: int,
    protocol: str,
    run_dir: Path,
    threads: int = 1,
    overrides: dict[str, Any] | None = None,
) -> TrainConfig:
    """The TrainConfig of one bench run.

    Start from the preset ``configs/<bench>_<balancer>.json`` when it exists (the published
    hyper-parameters), else the defaults with that balancer; then seed, steps, protocol
    (which sets the training env's episode length and goal mode), run_dir, threads,
    progress=False; then the ``--set`` overrides. Raises ConfigError for bad keys/values.
    """
    data = to_dict(TrainConfig())
    preset = preset_path(benchmark, balancer)
    preset_data = None
    if preset.is_file():
        try:
            preset_data = json.loads(preset.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"preset {str(preset)!r} is not valid JSON: {exc}") from exc
        named = preset_data.get("balancer") if isinstance(preset_data, dict) else None
        if (isinstance(named, str) and named != balancer
                and named.replace("-", "_") == balancer.replace("-", "_")):
            preset_data = None  # a built-in's (nash-mtl's), not this plug-in's (nash_mtl)
    if preset_data is not None:
        data = _merge(data, preset_data)
        if "balancer_kwargs" in preset_data:
            data["balancer_kwargs"] = dict(preset_data["balancer_kwargs"])
    else:  # (FAMO without a preset: the critic only, as its presets)
        data["balancer"] = balancer
        data["balancer_kwargs"] = {}
        kwargs = (overrides or {}).get("balancer_kwargs")
        data["sac"]["balance"] = list(default_balance(
            balancer, kwargs if isinstance(kwargs, dict) else None))
    if data.get("balancer") != balancer:
        raise ConfigError(f"preset {str(preset)!r} is for balancer {data.get('balancer')!r}, "
                          f"not {balancer!r}")
    data = _merge(data, {
        "env": {"benchmark": benchmark, "seed": seed, **PROTOCOL_TRAIN_ENV[protocol]},
        "total_steps": steps,
        "protocol": protocol,
        "run_dir": str(run_dir),
        "threads": threads,
        "progress": False,
    })
    if overrides:
        data = _merge(data, overrides)
    try:
        cfg = from_dict(TrainConfig, data)
        # with the task count: a batch size that does not split into the tasks is found
        # here (--dry-run included), not at each run's start
        validate(cfg, num_tasks=len(cfg.env.task_names))
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # EnvConfig/SACConfig value checks
        raise ConfigError(f"invalid run configuration ({balancer}, seed {seed}): {exc}") from exc
    return cfg


def run_state(run_dir: Path, total_steps: int | None = None) -> str:
    """``done`` (a readable result.json, for at least ``total_steps`` when given),
    ``resume`` (checkpoint.pt, not done: a damaged result.json is written again by the
    resumed run) or ``new``."""
    result = read_json_object(run_dir / "result.json")
    if result is not None:
        step = result.get("step")
        if total_steps is None or not isinstance(step, int) or step >= total_steps:
            return "done"  # (a result without a step: trust it)
    ckpt = run_dir / "checkpoint.pt"
    if ckpt.exists() or ckpt.is_symlink():  # (one that is not a readable file is named
        return "resume"  # by the resume's error; as "new" its logs would be deleted)
    return "new"


def _stranded(run_dir: Path, total_steps: int) -> str | None:
    """Why a run with a result.json but no checkpoint cannot be continued (``None`` if it
    has no result.json). Starting it afresh would delete its results."""
    if not (run_dir / "result.json").is_file():
        return None
    result = read_json_object(run_dir / "result.json")
    if result is None:
        return f"{run_dir}: its result.json cannot be read and it has no checkpoint.pt to resume"
    return (f"{run_dir}: finished at step {result.get('step')}, short of --steps "
            f"({total_steps}), and it has no checkpoint.pt to extend it from")


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    c = {k: v for k, v in config.items() if k not in RUNTIME_KEYS and k != "task_names"}
    if isinstance(c.get("env"), dict):
        c["env"] = {k: v for k, v in c["env"].items() if k != "device"}
    return json.loads(json.dumps(c))


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} -> {b!r}"]


def plan_runs(spec: BenchSpec) -> list[RunPlan]:
    """Validate the spec and build every run's config; check existing runs still match."""
    benchmark = _benchmark_name(spec.benchmark)
    if spec.protocol not in PROTOCOL_TRAIN_ENV:
        raise ConfigError(f"unknown protocol {spec.protocol!r}; valid choices: "
                          f"{', '.join(PROTOCOL_TRAIN_ENV)}")
    _check_int("--seeds", spec.seeds)
    _check_int("--steps", spec.steps)
    _check_int("--threads-per-run", spec.threads_per_run)
    if spec.workers is not None:
        _check_int("--workers", spec.workers)
    if not (spec.gpus_per_run == 0 or MIN_GPUS_PER_RUN <= spec.gpus_per_run < math.inf):
        raise ConfigError(f"--gpus-per-run must be 0 (no GPU) or at least {MIN_GPUS_PER_RUN}, "
                          f"got {spec.gpus_per_run!r}")
    if spec.launcher not in LAUNCHERS:
        raise ConfigError(f"unknown launcher {spec.launcher!r}; valid: {', '.join(LAUNCHERS)}")
    if spec.address and spec.launcher != "ray":
        raise ConfigError("--address is only used with --launcher ray")
    if spec.report:  # (not only after every run has trained)
        _check_int("--reps", spec.reps)
        _check_int("--poi-reps", spec.poi_reps)
    balancers = parse_balancers(spec.balancers)
    overrides = parse_overrides(spec.overrides)
    out = Path(spec.out).resolve()
    plans, mismatched, stranded = [], [], []
    for balancer in balancers:
        for seed in range(spec.seeds):
            run_dir = out / "runs" / balancer / f"seed{seed}"
            cfg = run_config(benchmark, balancer, seed, spec.steps, spec.protocol, run_dir,
                             spec.threads_per_run, overrides)
            config = to_dict(cfg)
            state = run_state(run_dir, cfg.total_steps)
            why = _stranded(run_dir, cfg.total_steps) if state == "new" else None
            if why:
                stranded.append(why)
            existing = run_dir / "config.json"
            if state != "new" and existing.is_file():
                old = read_json_object(existing)
                if old is not None:
                    diff = _differences(_comparable(old), _comparable(config))
                    before = old.get("total_steps")
                    if isinstance(before, int) and before > cfg.total_steps:
                        diff.insert(0, f"total_steps: {before} -> {cfg.total_steps} (a bench "
                                       "extends its runs with a larger --steps, it does not "
                                       "shorten them)")
                    if diff:
                        mismatched.append(f"{run_dir}: {'; '.join(diff[:4])}")
            plans.append(RunPlan(balancer, seed, run_dir, config, state))
    if spec.launcher == "local" and plans:  # (Ray's workers may have the device this lacks)
        from mtrl.trainer import resolve_device

        resolve_device(plans[0].config["device"])  # (one --set device for every run)
    if stranded:
        raise ConfigError(
            "existing run(s) in the output directory cannot be continued, and starting them "
            "again would delete their results; use another --out, or delete those run "
            "directories to train them from the start:\n  " + "\n  ".join(stranded)
        )
    if mismatched:
        raise ConfigError(
            "existing run(s) in the output directory were made with a different "
            "configuration (existing -> requested); use another --out or delete them:\n  "
            + "\n  ".join(mismatched)
        )
    return plans


def _benchmark_name(name: str) -> str:
    from mtrl.envs import BENCHMARKS

    return _canonical(name, BENCHMARKS, "benchmark")


def _check_int(option: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{option} must be an integer >= 1, got {value!r}")


# ====================================================================== one run
@dataclass(frozen=True)
class Job:
    """What a worker (local thread or Ray task) needs to execute one run."""

    balancer: str
    seed: int
    run_dir: str
    config_text: str
    resume: bool
    env: dict[str, str] = field(default_factory=dict)
    pythonpath: str = ""


@dataclass
class RunOutcome:
    balancer: str
    seed: int
    run_dir: str
    action: str  # "skipped" (already finished) | "resumed" | "started" | "not started" |
    #              "cancelled" (a Ray task cancelled by Ctrl-C)
    status: str  # "done" | "failed" | "interrupted" | "not started"
    returncode: int | None = None
    error: str | None = None
    log: str | None = None
    seconds: float = 0.0
    node: str | None = None


def _tail(path: Path, offset: int, lines: int = ERROR_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    kept = [x for x in text.splitlines() if x.strip()]
    return "\n".join(kept[-lines:])


def _headline(tail: str, returncode: int | None) -> str:
    lines = tail.splitlines()
    errors = [x for x in lines if x.startswith("error:")]
    if errors:
        return errors[-1]
    for x in reversed(lines):  # last line of a traceback: "SomeError: message"
        head = x.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Interrupt")) and " " not in head:
            return x
    return f"exit status {returncode}" + (f": {lines[-1]}" if lines else "")


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def _unblock_sigint() -> set[signal.Signals] | None:
    if not hasattr(signal, "pthread_sigmask"):
        return None
    return signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def execute_run(
    job: Job,
    on_start: Callable[[subprocess.Popen], None] | None = None,
    lock_fd: int | None = None,
) -> dict:
    """Run one training run as a subprocess; return a RunOutcome as a dict.

    Used by both launchers (inside a Ray task it runs on whichever node got the task).
    KeyboardInterrupt (Ctrl-C, ``ray.cancel``) forwards one SIGINT to the run, which then
    writes a checkpoint and stops; the outcome is ``interrupted``. ``lock_fd``: the bench's
    lock, inherited by the run (local launcher).
    """
    import platform

    run_dir = Path(job.run_dir)
    config_path = run_dir / BENCH_CONFIG
    try:
        # nothing in the directory is touched while a process trains there (an `mtrl
        # train` started by hand, a run of a killed bench): its files are live
        with run_dir_lock(run_dir):
            atomic_write_text(config_path, job.config_text)
            (run_dir / STOP_NAME).unlink(missing_ok=True)  # from an earlier, stopped bench
            if not job.resume:  # files of a run that died before its first checkpoint
                for name in STALE_FILES:
                    path = run_dir / name
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path)
                    else:
                        path.unlink(missing_ok=True)
    except RunDirBusy:
        return asdict(RunOutcome(
            job.balancer, job.seed, str(run_dir), "not started", "failed",
            error=f"another mtrl process is training in {str(run_dir)}; it was left alone "
            "(rerun the bench when that process has ended)"))
    cmd = [sys.executable, "-m", "mtrl.cli", "train", "--config", str(config_path)]
    if job.resume:
        cmd += ["--resume", str(run_dir)]
    env = dict(os.environ)
    env.update(job.env)
    env["PYTHONUNBUFFERED"] = "1"
    if job.pythonpath and Path(job.pythonpath).is_dir():
        env["PYTHONPATH"] = os.pathsep.join(
            x for x in (job.pythonpath, env.get("PYTHONPATH", "")) if x)
    log_path = run_dir / LOG_NAME
    outcome = RunOutcome(job.balancer, job.seed, str(run_dir),
                         "resumed" if job.resume else "started", "failed", log=str(log_path),
                         node=platform.node())
    t0 = time.monotonic()
    with open(log_path, "ab") as log:
        log.write(f"\n=== mtrl bench: {'resume' if job.resume else 'start'} "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')} on {platform.node()}: "
                  f"{' '.join(cmd)}\n".encode())
        log.flush()
        offset = log.tell()
        # The child inherits this thread's signal mask; Ray worker threads block SIGINT,
        # which would make the run deaf to the SIGINT that asks it to checkpoint and stop.
        old_mask = _unblock_sigint()
        try:
            # The run inherits the bench's lock (when this process holds one): if the bench
            # dies (kill -9, a lost terminal) while runs go on, no second bench can start
            # the same runs in the same directories until they end.
            keep = lock_fd if lock_fd is not None and _fd_open(lock_fd) else None
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, cwd=str(run_dir),
                                    start_new_session=True,  # Ctrl-C is forwarded once, below
                                    pass_fds=() if keep is None else (keep,))
        except OSError as exc:
            outcome.error = f"could not start the run: {exc}"
            return asdict(outcome)
        finally:
            if old_mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        if on_start is not None:
            on_start(proc)
        interrupted = False
        stop_file = run_dir / STOP_NAME
        keyboard_interrupts = 0
        while True:
            try:
                # Poll, not a blocking wait: Ray's cancel raises KeyboardInterrupt
                # asynchronously, which only lands while Python code runs.
                proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if not interrupted and stop_file.exists():  # the Ray launcher's stop
                    interrupted = True
                    proc.send_signal(signal.SIGINT)
                continue
            except KeyboardInterrupt:
                # (the stop file and Ray's cancel are one request: only a second
                # KeyboardInterrupt is "stop at once")
                if keyboard_interrupts:  # a second interrupt: stop the run at once
                    proc.kill()
                elif not interrupted:
                    interrupted = True
                    proc.send_signal(signal.SIGINT)
                keyboard_interrupts += 1
    outcome.returncode = proc.returncode
    outcome.seconds = time.monotonic() - t0
    try:
        total = json.loads(job.config_text).get("total_steps")
    except (json.JSONDecodeError, AttributeError):
        total = None
    finished = run_state(run_dir, total if isinstance(total, int) else None) == "done"
    if finished and proc.returncode in (0, 130, -signal.SIGINT):
        # (130 / -SIGINT with a result: the run had finished when the bench's Ctrl-C
        # reached it, during its last clean-up)
        outcome.status = "done"
    elif proc.returncode in (130, -signal.SIGINT) or (
            interrupted and proc.returncode == -signal.SIGKILL):
        # (-SIGINT: Ctrl-C reached the run before its handler was installed, while it was
        # still starting up; it had nothing to checkpoint yet. -SIGKILL: the second
        # interrupt's kill. Any other status after a stop request is the run's own
        # failure, e.g. its stop checkpoint could not be written: reported below)
        outcome.status = "interrupted"
        outcome.error = "interrupted; rerun the bench to resume (or start) it"
    else:
        tail = _tail(log_path, offset)
        if proc.returncode == 0:
            outcome.error = ("the run exited normally but wrote no result.json" +
                             (f" (last log lines:\n{tail})" if tail else ""))
        else:
            headline, lines = _headline(tail, proc.returncode), tail.splitlines()
            if lines and lines[-1] == headline:  # (said once, as the headline)
                lines.pop()
            outcome.error = "\n".join([headline, *lines])
    return asdict(outcome)


def _jobs(plans: Sequence[RunPlan], spec: BenchSpec) -> list[Job]:
    threads = str(spec.threads_per_run)
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    pythonpath = str(Path(__file__).resolve().parent.parent)
    return [
        Job(p.balancer, p.seed, str(p.run_dir), json.dumps(p.config, indent=2) + "\n",
            resume=p.state == "resume", env=env, pythonpath=pythonpath)
        for p in plans if p.state != "done"
    ]


# ====================================================================== launchers
def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _gpu_count() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and not visible.strip():
        return 0
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def local_slots(spec: BenchSpec, uses_gpu: bool) -> tuple[int, list[str | None]]:
    """(workers, per-slot CUDA_VISIBLE_DEVICES value) for the local launcher."""
    workers = spec.workers or max(1, _cpu_count() // spec.threads_per_run)
    gpus = _gpu_count() if uses_gpu else 0
    if gpus and spec.gpus_per_run > 0:
        per_gpu = max(1, int(1 / spec.gpus_per_run + 1e-9))
        # torch numbers the GPUs this process may see; a child needs the parent's names
        # for them (its CUDA_VISIBLE_DEVICES entries, indices or UUIDs)
        visible = [x.strip() for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
                   if x.strip()]
        names = visible[:gpus] if len(visible) >= gpus else [str(g) for g in range(gpus)]
        slots = [names[g] for _ in range(per_gpu) for g in range(gpus)]
        if spec.workers is None:
            workers = min(workers, len(slots))
        return workers, [slots[i % len(slots)] for i in range(workers)]
    # No GPUs, or --gpus-per-run 0: keep runs on the CPU.
    return workers, [None if not gpus else "" for _ in range(workers)]


class _Progress:
    """The bench's progress in finished runs (off a terminal: a line for each), and a
    FAILED line on stdout as each run fails (also with ``enabled=False``, which hides the
    progress)."""

    def __init__(self, total: int, initial: int, enabled: bool = True) -> None:
        self.bar = Progress(total, initial, unit="run", desc="bench", line_interval_s=0.0,
                            enabled=enabled)
        self.failed = 0

    def update(self, outcome: dict) -> None:
        if outcome["status"] == "failed":
            self.failed += 1
            self.write(f"FAILED {outcome['balancer']} seed {outcome['seed']}: "
                       f"{(outcome['error'] or '').splitlines()[0]} (log: {outcome['log']})")
        self.bar.set_postfix(failed=self.failed)
        self.bar.update(1)

    def write(self, line: str) -> None:
        """A message line on stdout (above the bar, if there is one)."""
        self.bar.write(line)

    def close(self) -> None:
        self.bar.close()


def launch_local(jobs: Sequence[Job], spec: BenchSpec, progress: _Progress,
                 uses_gpu: bool, lock_fd: int | None = None) -> list[dict]:
    """Run the jobs in at most ``workers`` parallel subprocesses."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    workers, devices = local_slots(spec, uses_gpu)
    free = list(devices)
    lock = threading.Lock()
    running: set[subprocess.Popen] = set()
    stopping = threading.Event()

    def work(job: Job) -> dict:
        if stopping.is_set():
            return asdict(RunOutcome(job.balancer, job.seed, job.run_dir, "not started",
                                     "not started"))
        with lock:
            device = free.pop()
        extra = {} if device is None else {"CUDA_VISIBLE_DEVICES": device}
        job = Job(**{**asdict(job), "env": {**job.env, **extra}})

        def started(proc: subprocess.Popen) -> None:
            with lock:
                running.add(proc)
                if stopping.is_set():  # Ctrl-C came while this run was being launched
                    proc.send_signal(signal.SIGINT)

        try:
            return execute_run(job, on_start=started, lock_fd=lock_fd)
        except Exception as exc:  # setting the run up failed (permissions, a bad path)
            return asdict(RunOutcome(
                job.balancer, job.seed, job.run_dir, "resumed" if job.resume else "started",
                "failed", error=f"could not set up the run: {type(exc).__name__}: {exc}",
                log=str(Path(job.run_dir) / LOG_NAME)))
        finally:
            with lock:
                free.append(device)
                running.difference_update({p for p in running if p.poll() is not None})

    collected: dict[Any, dict] = {}  # future -> outcome (idempotent if interrupted mid-way)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bench")
    futures = [pool.submit(work, job) for job in jobs]

    def collect(pending: list) -> None:
        for f in pending:
            if f not in collected:
                collected[f] = f.result()

    try:
        pending = set(futures)
        while pending:
            # With a timeout, not a blocking wait: a SIGINT that the kernel delivers to a
            # worker thread only sets Python's flag, and the main thread acts on it (raises
            # KeyboardInterrupt) only when it wakes up; a blocking wait would sleep until a
            # run finished.
            done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for f in done:
                collected[f] = f.result()
                pending.discard(f)
                progress.update(collected[f])
    except KeyboardInterrupt:
        with lock:
            stopping.set()
            for proc in running:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)  # the run checkpoints and exits
        progress.write("interrupted: waiting for running runs to write checkpoints "
                       "(Ctrl-C again to stop them at once) ...")
        killed: set[str] = set()
        try:
            collect(futures)
        except KeyboardInterrupt:  # a second Ctrl-C: stop the runs now
            with lock:
                for proc in running:
                    if proc.poll() is None:
                        proc.kill()
                        killed.add(str(proc.args[proc.args.index("--config") + 1]))
            progress.write("stopped the running runs without a checkpoint")
            collect(futures)
        outcomes = [collected[f] for f in futures if f in collected]
        for o in outcomes:  # killed on request: interrupted, not failed
            if str(Path(o["run_dir"]) / BENCH_CONFIG) in killed and o["status"] == "failed":
                o["status"] = "interrupted"
                o["error"] = ("stopped by a second Ctrl-C; rerun the bench to resume it from "
                              "its last checkpoint")
        raise _Interrupted(outcomes) from None
    finally:
        pool.shutdown(wait=True)
    return [collected[f] for f in futures]


class _Interrupted(Exception):
    def __init__(self, results: list[dict]) -> None:
        super().__init__("interrupted")
        self.results = results


#: What stops a bench besides Ctrl-C (a scheduler's SIGTERM, a lost terminal): its handler
#: asks the runs to checkpoint and stop.
STOP_SIGNALS = ("SIGTERM", "SIGHUP")


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """A ``host:port`` (or ``ray://host:port``) Ray address must accept a connection:
    ``ray.init`` retries an unreachable one for ever."""
    import socket

    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return  # ("auto", a name Ray resolves itself)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(f"could not reach the Ray cluster at {address!r} within "
                          f"{timeout:g} s: {exc}") from exc


def launch_ray(jobs: Sequence[Job], spec: BenchSpec, progress: _Progress,
               uses_gpu: bool, lock_fd: int | None = None) -> list[dict]:
    """Each job is a Ray task that runs the same subprocess on whichever node it lands."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("--launcher ray needs the 'ray' package (pip install 'mtrl[bench]')"
                          ) from exc
    started_here = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False}
        if spec.address:
            kwargs["address"] = spec.address
            kwargs.pop("include_dashboard")
        else:
            cpus = (spec.workers or max(1, _cpu_count() // spec.threads_per_run))
            kwargs["num_cpus"] = cpus * spec.threads_per_run
        if spec.address:
            _check_reachable(spec.address)
        # ray.init puts its own SIGTERM handler (kill the driver) over the bench's, which
        # asks the runs to checkpoint and stop: the bench's go back after it
        ours = {s: signal.getsignal(s)
                for s in (getattr(signal, n) for n in STOP_SIGNALS if hasattr(signal, n))}
        try:
            ray.init(**kwargs)
        except Exception as exc:
            where = f"the Ray cluster at {spec.address!r}" if spec.address else "local Ray"
            raise ConfigError(f"could not start {where}: {type(exc).__name__}: {exc}") from exc
        finally:
            for signum, handler in ours.items():
                if callable(handler) and signal.getsignal(signum) is not handler:
                    signal.signal(signum, handler)
        started_here = True
    try:
        cluster_gpus = ray.cluster_resources().get("GPU", 0) if uses_gpu else 0
        num_gpus = spec.gpus_per_run if cluster_gpus else 0
        task = ray.remote(num_cpus=spec.threads_per_run, num_gpus=num_gpus,
                          max_retries=0)(execute_run)
        extra = {} if num_gpus else {"CUDA_VISIBLE_DEVICES": ""}
        refs = {task.remote(Job(**{**asdict(j), "env": {**j.env, **extra}})): j for j in jobs}
        results: list[dict] = []
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1, timeout=0.5)  # as in launch_local
                for ref in done:
                    job = refs[ref]
                    try:
                        outcome = ray.get(ref)
                    except Exception as exc:  # the task itself died (node lost, ...)
                        outcome = asdict(RunOutcome(
                            job.balancer, job.seed, job.run_dir,
                            "resumed" if job.resume else "started", "failed",
                            error=f"Ray task failed: {type(exc).__name__}: {exc}",
                            log=str(Path(job.run_dir) / LOG_NAME)))
                    outcome = _check_visible(outcome)
                    results.append(outcome)
                    progress.update(outcome)
        except KeyboardInterrupt:
            for ref in pending:  # first, before anything that could fail (a lost terminal)
                # the task forwards SIGINT to its run when it sees the stop file (seen: a
                # plain ray.cancel never reached the task, and the run trained to its end)
                with contextlib.suppress(OSError):
                    (Path(refs[ref].run_dir) / STOP_NAME).touch()
                ray.cancel(ref)  # KeyboardInterrupt inside the task -> SIGINT to the run
            progress.write("interrupted: asking running runs to write checkpoints ...")
            for ref in pending:
                job = refs[ref]
                try:
                    try:
                        results.append(ray.get(ref))
                    except KeyboardInterrupt:  # a second Ctrl-C: stop the runs now
                        progress.write("stopping the running runs without a checkpoint")
                        for other in pending:
                            ray.cancel(other, force=True)
                        raise RuntimeError("cancelled") from None
                except Exception:  # TaskCancelledError: judge by what the run left behind
                    status = {"done": "done", "resume": "interrupted"}.get(
                        run_state(Path(job.run_dir)), "not started")
                    results.append(asdict(RunOutcome(
                        job.balancer, job.seed, job.run_dir, "cancelled", status,
                        log=str(Path(job.run_dir) / LOG_NAME))))
            raise _Interrupted(results) from None
        return results
    finally:
        if started_here:
            ray.shutdown()


def _check_visible(outcome: dict) -> dict:
    """A run that finished on another node must be visible here (shared filesystem)."""
    if outcome["status"] == "done" and not (Path(outcome["run_dir"]) / "result.json").is_file():
        outcome["status"] = "failed"
        outcome["error"] = (
            f"the run finished on node {outcome.get('node')!r} but its result.json is not "
            f"visible here at {outcome['run_dir']}; with Ray on several nodes the --out "
            "directory must be on a filesystem shared by all nodes"
        )
    return outcome


# ====================================================================== the bench
@dataclass
class BenchResult:
    out: Path
    outcomes: list[dict]
    interrupted: bool = False
    report_files: list[Path] = field(default_factory=list)
    report_error: str | None = None
    #: The report's notes (runs of different lengths or settings pooled, ...).
    report_notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[dict]:
        return [o for o in self.outcomes if o["status"] == "failed"]

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 1 if self.failed or self.report_error else 0


def run_bench(spec: BenchSpec, progress: bool = True) -> BenchResult:
    """Plan, launch the missing runs, record outcomes in OUT/bench.json, write the report."""
    plan_runs(spec)  # validate everything before creating anything
    out = Path(spec.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out) as lock_fd:
        return _run_bench(spec, plan_runs(spec), out, progress, lock_fd)  # states under lock


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[int | None]:
    """One bench at a time per output directory (two would launch the same runs)."""
    try:
        import fcntl
    except ImportError:  # not Unix: no lock
        yield None
        return
    with open(out / ".bench.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ConfigError(
                f"another mtrl bench, or runs started by one that was killed, is still "
                f"running on {str(out)!r}; wait for it or choose another --out") from None
        try:
            yield f.fileno()  # the runs inherit it (see execute_run)
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run_bench(spec: BenchSpec, plans: list[RunPlan], out: Path, progress: bool,
               lock_fd: int | None = None) -> BenchResult:
    jobs = _jobs(plans, spec)
    skipped = [
        asdict(RunOutcome(p.balancer, p.seed, str(p.run_dir), "skipped", "done",
                          log=str(p.run_dir / LOG_NAME)))
        for p in plans if p.state == "done"
    ]
    uses_gpu = any(p.config.get("device") != "cpu" for p in plans)
    bar = _Progress(total=len(plans), initial=len(skipped), enabled=progress)
    interrupted = False

    def on_term(signum: int, frame: Any) -> None:
        if signum == getattr(signal, "SIGHUP", None):
            on_hangup()  # the second hangup is ignored; output to /dev/null
        raise KeyboardInterrupt

    # a lost terminal or SSH session stops the runs cleanly too, unless SIGHUP is ignored
    # (nohup): then the bench goes on
    previous = install_stop_handlers(on_term, STOP_SIGNALS)
    try:
        launch = launch_ray if spec.launcher == "ray" else launch_local
        outcomes = launch(jobs, spec, bar, uses_gpu, lock_fd=lock_fd) if jobs else []
    except _Interrupted as exc:
        outcomes, interrupted = exc.results, True
    finally:
        bar.close()
        restore_handlers(previous)
    order = {(p.balancer, p.seed): i for i, p in enumerate(plans)}
    outcomes = sorted(skipped + outcomes, key=lambda o: order[(o["balancer"], o["seed"])])
    def relative(o: dict) -> dict:  # bench.json is committed with reports: no local paths
        o = dict(o)
        for key in ("run_dir", "log"):
            if o.get(key):
                p = Path(o[key])
                o[key] = str(p.relative_to(out)) if p.is_relative_to(out) else str(p)
        return o

    record = {
        # (out: "." = where bench.json is; no local path in a committed report)
        "command": {k: ("." if k == "out" else str(v) if isinstance(v, Path) else v)
                    for k, v in asdict(spec).items()},
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "interrupted": interrupted,
        "runs": [relative(o) for o in outcomes],
    }
    atomic_write_json(out / "bench.json", record)
    result = BenchResult(out, outcomes, interrupted)
    if spec.report:
        from mtrl.report import ReportError, write_report

        try:
            report = write_report(out, reps=spec.reps, poi_reps=spec.poi_reps)
            result.report_files = report.files
            result.report_notes = [w for g in report.groups for w in g.warnings]
        except (ReportError, MemoryError, OSError) as exc:  # the runs' outcomes still show
            result.report_error = str(exc) or type(exc).__name__
    return result


def format_plan(plans: Sequence[RunPlan]) -> str:
    """What a bench would do (``mtrl bench --dry-run``)."""
    what = {"done": "skip (finished)", "resume": "resume from checkpoint", "new": "start"}
    lines = []
    for p in plans:
        c = p.config
        kwargs = ", ".join(f"{k}={v}" for k, v in sorted(c["balancer_kwargs"].items()))
        preset = preset_path(c["env"]["benchmark"], p.balancer)
        lines.append(
            f"{what[p.state]:<24} {p.run_dir}\n"
            f"{'':<24} {c['env']['benchmark']} {p.balancer}({kwargs}) seed {p.seed}, "
            f"{c['total_steps']} steps, {c['protocol']} protocol "
            f"({c['env']['max_episode_steps']}-step episodes, {c['env']['goal_mode']} goals), "
            f"batch {c['batch_size']}, "
            + (f"preset {preset.name}" if preset.is_file() else "no preset: defaults")
        )
    counts = {s: sum(p.state == s for p in plans) for s in what}
    lines.append(f"{len(plans)} run(s): {counts['new']} to start, {counts['resume']} to resume, "
                 f"{counts['done']} finished")
    return "\n".join(lines)


def format_outcomes(result: BenchResult) -> str:
    """Human-readable end-of-bench summary (what ran, what failed and where to look)."""
    counts: dict[str, int] = {}
    for o in result.outcomes:
        key = "skipped (already finished)" if o["action"] == "skipped" else o["status"]
        counts[key] = counts.get(key, 0) + 1
    lines = [f"bench: {len(result.outcomes)} run(s): "
             + ", ".join(f"{n} {k}" for k, n in counts.items())]
    for o in result.failed:
        status = "" if o.get("returncode") is None else f", exit status {o['returncode']}"
        lines.append(f"\nFAILED {o['balancer']} seed {o['seed']} ({o['action']}{status}): "
                     f"{o['run_dir']}")
        lines.append("  " + (o["error"] or "").replace("\n", "\n  "))
        if o.get("log"):
            lines.append(f"  full log: {o['log']}")
    if result.failed:
        lines.append("\nFix the cause and rerun the same command: finished runs are skipped, a "
                     "failed run resumes from its checkpoint (delete its run directory to start "
                     "it over).")
    if result.report_files:
        lines.append("\nreport: " + ", ".join(str(p) for p in result.report_files
                                              if p.suffix in (".md", ".csv")))
        lines += [f"note: {w}" for w in result.report_notes]
    if result.report_error:
        lines.append(f"\nreport not written: {result.report_error}")
    if result.interrupted and any(o["status"] != "done" for o in result.outcomes):
        lines.append("\ninterrupted: rerun the same command to resume the unfinished runs")
    return "\n".join(lines)
