"""The training loop. It reads top to bottom:

warm-up with random actions -> act -> step the vector env -> store -> sample -> update
-> log -> evaluate -> checkpoint, with resume, Ctrl-C and NaN handling around it.

Steps count vector-env steps: each adds one transition per task (K env-steps).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mtrl.agents.sac import MultiTaskSAC
from mtrl.balancers import build
from mtrl.buffers import MultiTaskReplayBuffer
from mtrl.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    atomic_write_json,
    atomic_write_text,
    load_checkpoint,
    read_json_object,
    remove_stale_temp_files,
    save_checkpoint,
)
from mtrl.config import (
    RESUME_MAY_CHANGE,
    RUN_LOGS,
    ConfigError,
    TrainConfig,
    from_dict,
    read_run_config,
    resume_changes,
    to_dict,
    validate,
)
from mtrl.envs import PROTOCOLS, eval_env_config, eval_seed, evaluate, make_envs
from mtrl.progress import Progress, evaluation_progress, status
from mtrl.runtime import (
    RunDirBusy,
    configure_cpu,
    first_line,
    install_stop_handlers,
    on_hangup,
    out_of_memory,
    restore_handlers,
    run_dir_lock,
    whole_message,
)

CHECKPOINT_NAME = "checkpoint.pt"
#: What a resume reads from a checkpoint (the rest is optional).
RESUME_KEYS = ("step", "agent", "optim", "rng", "obs", "skipped_total", "best_success")


class TrainingError(RuntimeError):
    """The run had to stop (e.g. repeated NaN updates); the message says why and what is kept."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_eval: dict[str, Any] | None
    skipped_updates: int
    interrupted: bool = False
    already_finished: bool = False
    """Resumed a run that had already reached ``total_steps``: nothing was run or written."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(
            f"invalid device {name!r}; valid: auto, cpu, cuda, cuda:N, mps"
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use cpu or auto")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r} requested but MPS is not available; use cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(
            f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
        )
    return dev


def _device_index(device: torch.device) -> int:
    """The index of ``device``; a CUDA device without one is the current device."""
    if device.index is not None:
        return device.index
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.current_device()
    return 0


def _same_device(name: str, device: torch.device) -> bool:
    """Whether ``name`` is ``device``: ``cuda`` is the current CUDA device, so it matches
    ``cuda:N`` only when N is the current one (``cpu`` and ``cpu:0`` match)."""
    try:
        other = torch.device(name)
    except (RuntimeError, TypeError):
        return False
    return other.type == device.type and _device_index(other) == _device_index(device)


def default_run_dir(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{cfg.env.benchmark.lower()}-{cfg.balancer}-s{cfg.env.seed}"


class _MetricsLog:
    """JSONL always (``metrics.jsonl``, ``eval.jsonl``); TensorBoard when it is installed."""

    def __init__(self, run_dir: Path, purge_after: int | None = None) -> None:
        """``purge_after``: a resumed run's checkpoint step. Its JSONL logs are cut back
        to that step; TensorBoard's events cannot be, so a purge marker makes TensorBoard
        drop the lost session's events after it (else those steps show twice)."""
        self.run_dir = run_dir
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard not installed: JSONL is enough
            return
        tb_dir = run_dir / "tb"
        try:
            tb_dir.mkdir(exist_ok=True)
            # The writer opens its event file in a background thread, where a failure
            # only prints a traceback: try a file here first.
            with tempfile.TemporaryFile(dir=tb_dir):
                pass
            purge = None if purge_after is None else purge_after + 1
            self.tb = SummaryWriter(str(tb_dir), purge_step=purge)
        except Exception as exc:  # (OSError mostly; TensorBoard must not stop the run)
            warnings.warn(
                f"TensorBoard logging is off for this run: cannot write to {str(tb_dir)!r} "
                f"({first_line(exc)}); metrics.jsonl and eval.jsonl are written as usual",
                stacklevel=2,
            )

    def write(self, name: str, record: dict[str, Any]) -> None:
        path = self.run_dir / name
        try:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:
            if exc.filename is not None:
                raise
            # a failed write (a full disk) names no file: say which log it was
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        if self.tb is not None:
            step = record["step"]
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class _SkipCounter:
    """Skipped updates, counted on the device and read back only by :meth:`check`.

    ``check`` raises :class:`TrainingError` when some run of consecutive skips since the
    last check reached ``limit`` (the longest run is tracked on the device, so a run that
    ended between two checks is not missed).
    """

    def __init__(self, device: torch.device, limit: int, total: int, run: int = 0) -> None:
        self.limit = limit
        self.total = torch.tensor(total, dtype=torch.int64, device=device)
        # ``run``: the consecutive skips a resumed run's checkpoint ended with
        self.run = torch.tensor(run, dtype=torch.int64, device=device)
        self.longest = self.run.clone()

    def add(self, skipped: Tensor) -> None:
        s = skipped.to(torch.int64)
        self.total += s
        self.run = (self.run + 1) * s
        self.longest = torch.maximum(self.longest, self.run)

    def check(self, step: int, ckpt_path: Path) -> int:
        """Raise if the limit was reached; return the total (a host read)."""
        longest = int(self.longest)
        self.longest = self.run.clone()
        if longest >= self.limit:
            kept = (f"the last good checkpoint is kept at {ckpt_path}" if ckpt_path.is_file()
                    else "no checkpoint had been written yet (delete the run directory "
                    "before running it again)")
            raise TrainingError(
                f"stopped at step {step}: {longest} consecutive updates had NaN/Inf losses "
                f"or gradients and were skipped; {kept}"
            )
        return int(self.total)


def _success_text(last_eval: dict[str, Any] | None) -> str:
    return "n/a" if last_eval is None else f"{last_eval['mean_success']:.2f}"


def _set_generator(gen: torch.Generator, saved: Tensor, seed: int, what: str) -> None:
    """Restore a generator; a state from another device type (a CUDA run resumed on the
    CPU, or the reverse) cannot be, so reseed from ``seed`` and say so."""
    try:
        gen.set_state(saved.cpu())
    except RuntimeError:
        gen.manual_seed(seed)
        warnings.warn(
            f"{what} was saved on another device type and was reseeded: the resumed run "
            "is not bit-identical to an uninterrupted one", stacklevel=2,
        )


def _warn_if_protocol_differs(cfg: TrainConfig) -> None:
    """Say so when a Meta-World run trains on other episodes than its protocol evaluates
    (e.g. ``--protocol metaworld-plus`` with the default 150-step, fixed-goal training
    env): allowed, but rarely meant."""
    spec = PROTOCOLS[cfg.protocol]
    mine = (cfg.env.max_episode_steps, cfg.env.goal_mode)
    if cfg.env.benchmark == "toy" or mine == (spec.max_episode_steps, spec.goal_mode):
        return
    warnings.warn(
        f"training episodes ({mine[0]} steps, {mine[1]} goals) differ from the episodes the "
        f"{cfg.protocol!r} protocol evaluates ({spec.max_episode_steps} steps, "
        f"{spec.goal_mode} goals); to train on those, pass --env.max-episode-steps "
        f"{spec.max_episode_steps} --env.goal-mode {spec.goal_mode}",
        stacklevel=3,
    )


def _eval_at(path: Path, step: int) -> dict[str, Any] | None:
    """The evaluation record of ``step`` in a JSONL log, if there is one."""
    if not path.is_file():
        return None
    found = None
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("step") == step:
            found = rec
    return found


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the records of a JSONL log up to step ``last_step`` (rewritten atomically)."""
    if not path.is_file():
        return
    kept, dropped = [], False
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):
            step = None  # a line cut short by a crash
        if isinstance(step, int) and step <= last_step:
            kept.append(line)
        else:
            dropped = True
    if dropped:
        atomic_write_text(path, "".join(x + "\n" for x in kept))


def _to_python(metrics: dict[str, Tensor]) -> dict[str, Any]:
    """Tensors to numbers/lists: done only at log intervals (it syncs with the device)."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        v = value.detach().float().cpu()
        out[key] = v.item() if v.numel() == 1 else [round(x, 6) for x in v.tolist()]
        if key.endswith("/losses"):  # the task-mean as a scalar, for TensorBoard and plots
            out[key[: -len("es")]] = v.mean().item()  # critic/losses -> critic/loss
    return out


def train(
    cfg: TrainConfig,
    resume: bool = False,
    env_factory: Callable[..., Any] | None = None,
) -> TrainResult:
    """Run (or resume) a training run described by ``cfg``; returns where it wrote.

    ``resume=True`` continues from ``run_dir/checkpoint.pt``. ``cfg`` must then equal the
    run's saved ``config.json`` except for the settings in
    :data:`mtrl.config.RESUME_MAY_CHANGE` (length, intervals, device, threads, ...); any
    other change is a :class:`ConfigError` listing it. Nothing in the run directory is
    written before the checkpoint has been restored, so a failed resume leaves the run as
    it was. Resuming a run that already reached ``total_steps`` (it has ``result.json``)
    runs and writes nothing (``TrainResult.already_finished``). ``env_factory`` (default
    :func:`mtrl.envs.make_envs`) builds the training and evaluation envs from an
    ``EnvConfig``.
    """
    # ------------------------------------------------------------------ set-up
    # The task count is known from the config (unless a custom factory builds the envs):
    # a batch that does not split into the tasks fails now, not after the envs are built
    # (MT50: ~45 s).
    validate(cfg, num_tasks=len(cfg.env.task_names) if env_factory is None else None)
    if env_factory is None:
        env_factory = make_envs
    device = resolve_device(cfg.device)
    configure_cpu(cfg.threads)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
    with exclusive_run_dir(run_dir):
        return _train(cfg, resume, env_factory, device, run_dir)


@contextlib.contextmanager
def exclusive_run_dir(run_dir: Path) -> Iterator[None]:
    """One training process per run directory, for the whole run
    (:func:`mtrl.runtime.run_dir_lock`).

    Two processes on one directory (a command run twice, ``--resume`` of a run that is
    still going) both "finished", with every log line twice and a ``config.json`` that
    need not match the checkpoint. Temp files of the run's atomic writes (checkpoint,
    config, result, the rewritten logs) left by a killed process are deleted once the
    lock is held (none can be live then).
    """
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(run_dir_lock(run_dir))
        except RunDirBusy:
            raise ConfigError(
                f"another mtrl process is training in {str(run_dir)!r}; wait for it to end "
                "(or stop it), or choose another --run-dir"
            ) from None
        except OSError as exc:  # (a file of that name, no permission to create it)
            raise ConfigError(f"cannot use run directory {str(run_dir)!r}: {exc}") from exc
        remove_stale_temp_files(run_dir, (CHECKPOINT_NAME, "config.json", *RUN_LOGS))
        yield


def _check_written_by_this_run(state: dict[str, Any], path: Path, cfg: TrainConfig) -> None:
    """A checkpoint names the settings it was written under (``"config"``; checkpoints of
    earlier mtrl versions do not, and are trusted): one copied in from another run would
    otherwise load whenever the shapes fit and train on under that run's weights,
    optimiser state and learning rates while ``config.json`` says otherwise."""
    if "config" not in state:
        return
    try:
        written = to_dict(from_dict(TrainConfig, state["config"]))
    except ConfigError as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} records settings this mtrl cannot read: {exc}"
        ) from exc
    changed = resume_changes(written, cfg)
    if changed:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was written by a run with other settings "
            f"({'; '.join(changed)}): it belongs to another run, not to this run directory"
        )


def _train(
    cfg: TrainConfig,
    resume: bool,
    env_factory: Callable[..., Any],
    device: torch.device,
    run_dir: Path,
) -> TrainResult:
    ckpt_path = run_dir / CHECKPOINT_NAME
    state: dict[str, Any] | None = None
    if resume:
        config_file = run_dir / "config.json"
        if config_file.is_file():
            saved_cfg, _ = read_run_config(config_file)
            # compared as parsed, so keys that older versions did not write count as
            # their defaults
            changed = resume_changes(to_dict(saved_cfg), cfg)
            if changed:
                raise ConfigError(
                    f"cannot resume {str(run_dir)!r} with a different configuration: "
                    f"{'; '.join(changed)}. Only these may change on resume: "
                    f"{', '.join(RESUME_MAY_CHANGE)}"
                )
        # CPU first: tensors go where they belong below (the agent's device, the envs'
        # and generators' own places).
        state = load_checkpoint(ckpt_path, map_location="cpu", required=RESUME_KEYS)
        _check_written_by_this_run(state, ckpt_path, cfg)
        start = int(state["step"])
        if start > cfg.total_steps:
            raise ConfigError(
                f"total_steps {cfg.total_steps} is below the checkpoint's step {start}; "
                f"resume with --total-steps >= {start}"
            )
        result_file = run_dir / "result.json"
        if start == cfg.total_steps and result_file.is_file():
            result = read_json_object(result_file)
            if result is not None:
                return TrainResult(run_dir, start, result.get("final_eval"),
                                   int(state["skipped_total"]), already_finished=True)
            # a damaged result.json: resumed like a run stopped before writing it (no
            # training left: one final evaluation, then result.json is written again)
            warnings.warn(f"{str(result_file)!r} cannot be read: evaluating the finished "
                          "run again to write it", stacklevel=2)
    elif ckpt_path.exists() or ckpt_path.is_symlink():
        raise ConfigError(
            f"run directory {str(run_dir)!r} already holds a checkpoint; "
            "resume it with --resume or choose another --run-dir"
        )
    else:
        # Logs without a checkpoint: a run that stopped (killed, NaN guard) before its
        # first checkpoint. A new run would append to its curves and mix the two.
        leftovers = [name for name in RUN_LOGS if (run_dir / name).exists()]
        if leftovers:
            raise ConfigError(
                f"run directory {str(run_dir)!r} holds logs of an earlier run "
                f"({', '.join(leftovers)}) but no checkpoint to resume from; delete them "
                "(or the directory) to start this run there, or choose another --run-dir"
            )
    torch.manual_seed(cfg.env.seed)
    _warn_if_protocol_differs(cfg)

    if cfg.env.device != type(cfg.env)().device and not _same_device(cfg.env.device, device):
        warnings.warn(
            f"env.device {cfg.env.device!r} is ignored: the environments hand their tensors "
            f"to the learner's device ({device}, from --device)", stacklevel=2,
        )
    env_cfg = replace(cfg.env, device=str(device))
    if cfg.progress:
        status(f"building the {cfg.env.benchmark} environments ...")
    envs = env_factory(env_cfg)
    num_tasks = envs.num_tasks
    try:
        validate(cfg, num_tasks=num_tasks)
        agent = MultiTaskSAC(
            envs.obs_dim,
            envs.act_dim,
            num_tasks,
            cfg.sac,
            lambda: build(cfg.balancer, **cfg.balancer_kwargs),
            device=device,
        )
        per_task = max(1, cfg.buffer_capacity // num_tasks)
        try:
            buffer = MultiTaskReplayBuffer(per_task, num_tasks, envs.obs_dim, envs.act_dim,
                                           device=device, seed=cfg.env.seed)
        except (RuntimeError, MemoryError) as exc:  # (torch: "can't allocate memory")
            floats = per_task * num_tasks * (2 * envs.obs_dim + envs.act_dim + 2)
            raise ConfigError(
                f"cannot allocate the replay buffer for buffer_capacity "
                f"{cfg.buffer_capacity} on {device} (~{floats * 4 / 2**30:,.1f} GiB): "
                f"{first_line(exc)}; choose a smaller --buffer-capacity"
            ) from exc
    except BaseException:
        envs.close()
        raise
    action_gen = torch.Generator(device=device).manual_seed(cfg.env.seed + 1)
    protocol = PROTOCOLS[cfg.protocol]
    eval_episodes = cfg.eval_episodes or protocol.episodes_per_task
    eval_envs = None

    # Training-episode statistics, kept on the device; read at log intervals only.
    ep_return = torch.zeros(num_tasks, device=device)
    ep_success = torch.zeros(num_tasks, dtype=torch.bool, device=device)
    done_return = torch.zeros(num_tasks, device=device)
    done_success = torch.zeros(num_tasks, device=device)
    done_count = torch.zeros(num_tasks, device=device)
    episode_stats = (ep_return, ep_success, done_return, done_success, done_count)

    start_step, skipped_total, skip_run = 0, 0, 0
    updates_from = cfg.warmup_steps  # updates start after this step (the buffer has data)
    best_success, last_eval = -1.0, None
    wall_before = 0.0  # wall-clock seconds spent in earlier sessions of a resumed run
    obs = envs.reset(seed=cfg.env.seed)
    if state is not None:
        try:
            agent.load_state_dict(state["agent"])
            agent.load_optimizer_state_dict(state["optim"])
            if "buffer" in state:
                buffer.load_state_dict(state["buffer"])
        except (RuntimeError, KeyError, ValueError) as exc:
            envs.close()
            raise CheckpointError(
                f"checkpoint {str(ckpt_path)!r} does not match this run's configuration: "
                f"{type(exc).__name__}: {whole_message(exc)}"
            ) from exc
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), device)
        if device.type == "mps" and "mps" in state["rng"]:
            torch.mps.set_rng_state(state["rng"]["mps"].cpu())
        _set_generator(action_gen, state["rng"]["actions"], cfg.env.seed + 1 + int(state["step"]),
                       "the warm-up action generator")
        restored_env = "env" in state and hasattr(envs, "load_state_dict")
        if restored_env:
            envs.load_state_dict(state["env"])
            obs = state["obs"].to(device)
        else:  # Meta-World simulators cannot be restored: start fresh episodes.
            obs = envs.reset(seed=cfg.env.seed + int(state["step"]))
            warnings.warn(
                "these environments cannot be checkpointed: the resumed run starts new "
                "episodes at the checkpoint step (agent, optimisers, buffer and generators "
                "are restored exactly; the run is not bit-identical to an uninterrupted one)",
                stacklevel=2,
            )
        saved_stats = state.get("episode_stats")
        if saved_stats is not None:  # the log window's finished episodes, and (when the
            # env resumes mid-episode) the running episodes' return and success
            for i, (mine, saved_t) in enumerate(zip(episode_stats, saved_stats, strict=True)):
                if i >= 2 or restored_env:
                    mine.copy_(saved_t.to(mine.device))
        start_step = int(state["step"])
        last_eval = _eval_at(run_dir / "eval.jsonl", start_step)  # not repeated at the end
        # (a checkpoint taken while a buffer was being refilled says until when)
        updates_from = int(state.get("updates_from", cfg.warmup_steps))
        if "buffer" not in state:  # saved without the buffer: refill it before updating
            updates_from = start_step + cfg.warmup_steps
            warnings.warn(
                f"the checkpoint holds no replay buffer (save_buffer=False): the policy acts "
                f"and fills a new buffer, and updates resume after step {updates_from}",
                stacklevel=2,
            )
        skipped_total = int(state["skipped_total"])
        skip_run = int(state.get("skip_run", 0))  # (not in checkpoints before 2026-11-29)
        for name, count in state.get("fallback_updates", {}).items():  # (nor this)
            if name in agent.fallback_updates:
                agent.fallback_updates[name] = int(count)
        best_success = float(state["best_success"])
        wall_before = float(state.get("wall_clock_s", 0.0))
        del state  # the buffer copy can be large
    # Written only now (the directory itself exists: exclusive_run_dir made it for its
    # lock): a resume that failed above leaves the run's files untouched.
    if resume:
        # The run goes on from its checkpoint: an older result.json (a shorter run being
        # extended) no longer describes it, and log records after the checkpoint step
        # come from a session whose work was lost (they would mix into the curves).
        (run_dir / "result.json").unlink(missing_ok=True)
        for name in ("metrics.jsonl", "eval.jsonl"):
            _truncate_jsonl(run_dir / name, start_step)
    saved_config = to_dict(cfg)
    atomic_write_json(run_dir / "config.json", saved_config | {"task_names": envs.task_names})
    log = _MetricsLog(run_dir, purge_after=start_step if resume else None)
    skips = _SkipCounter(device, cfg.max_consecutive_skips, skipped_total, skip_run)

    def checkpoint(step: int) -> None:
        nonlocal skipped_total
        skipped_total = skips.check(step, ckpt_path)  # never overwrite it after a failure
        # Nor with weights that are no longer numbers: finite losses and gradients can
        # still overflow in a step (the guard checks those, not the weights after it)
        named = list(agent.named_parameters())  # (one host read for all of them)
        finite = torch.stack([torch.isfinite(p).all() for _, p in named]).tolist()
        bad = [name for (name, _), ok in zip(named, finite, strict=True) if not ok]
        if bad:
            kept = (f"the last good checkpoint is kept at {ckpt_path}" if ckpt_path.is_file()
                    else "no checkpoint had been written yet")
            raise TrainingError(
                f"stopped at step {step}: the weights {', '.join(bad[:3])}"
                f"{' ...' if len(bad) > 3 else ''} are NaN/Inf (an optimiser step overflowed; "
                f"a learning rate too large?); {kept}"
            )
        rng = {"torch": torch.get_rng_state(), "actions": action_gen.get_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        elif device.type == "mps":  # the update noise is drawn there
            rng["mps"] = torch.mps.get_rng_state()
        state: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "config": saved_config,  # what this run is (checked on resume)
            "step": step,
            "agent": agent.state_dict(),
            "optim": agent.optimizer_state_dict(),
            "rng": rng,
            "obs": obs.cpu(),
            "episode_stats": [t.cpu() for t in episode_stats],
            "skipped_total": skipped_total,
            "skip_run": int(skips.run),  # a resumed run goes on counting consecutive skips
            "fallback_updates": dict(agent.fallback_updates),
            "best_success": best_success,
            "wall_clock_s": wall_before + time.perf_counter() - t_start,
            "updates_from": updates_from,
        }
        if cfg.save_buffer:
            state["buffer"] = buffer.state_dict()
        if hasattr(envs, "state_dict"):
            state["env"] = envs.state_dict()
        save_checkpoint(ckpt_path, state)

    def run_eval(step: int) -> dict[str, Any]:
        nonlocal eval_envs, best_success
        eval_cfg = replace(eval_env_config(cfg.env, cfg.protocol), device=str(device))
        if eval_envs is None:
            eval_envs = env_factory(eval_cfg)
        progress = evaluation_progress(eval_episodes, eval_cfg.max_episode_steps, cfg.progress)
        t_eval = time.perf_counter()
        try:  # (fork_rng: evaluation must not shift the training RNG)
            with progress as on_step, torch.random.fork_rng(devices=[]):
                result = evaluate(lambda o: agent.act(o, deterministic=True), eval_envs,
                                  eval_episodes, seed=eval_seed(cfg.env.seed, step),
                                  on_step=on_step)
        except Exception as exc:
            if not out_of_memory(exc):
                raise
            # the training state is intact (the evaluation runs beside it): keep it
            checkpoint(step)
            raise TrainingError(
                f"the evaluation at step {step} ran out of memory ({first_line(exc)}); "
                f"the run is checkpointed at step {step} in {ckpt_path}: resume it with a "
                f"smaller --eval-episodes (now {eval_episodes})"
            ) from None
        mean = float(result.mean_success)
        best_success = max(best_success, mean)
        record = {
            "step": step,
            "env_steps": step * num_tasks,
            "protocol": cfg.protocol,
            "episodes_per_task": eval_episodes,
            "eval_s": time.perf_counter() - t_eval,
            "mean_success": mean,
            "best_success": best_success,
            "success": {k: float(v) for k, v in result.success_rate.items()},
            "return": {k: float(v) for k, v in result.mean_return.items()},
        }
        log.write("eval.jsonl", record)
        return record

    if cfg.total_steps <= updates_from:
        warnings.warn(
            f"total_steps {cfg.total_steps} <= {updates_from}, the step after which updates "
            f"start (warmup_steps {cfg.warmup_steps}): this run only collects random-action "
            "data and makes no gradient update", stacklevel=2,
        )

    # Ctrl-C, SIGTERM (kill, a scheduler's time limit) or SIGHUP (a closed terminal;
    # not under nohup): finish the current step, write a checkpoint, then stop. A second
    # signal interrupts at once.
    interrupted = False
    stop_requests = 0  # Ctrl-C / SIGTERM: the second one stops at once

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal interrupted, stop_requests
        interrupted = True
        if signum == getattr(signal, "SIGHUP", None):
            # the kernel's second hangup is ignored; output goes to /dev/null. A hangup
            # never counts as "again": logging out sends SIGHUP and SIGTERM together
            on_hangup()
            return
        stop_requests += 1
        if stop_requests > 1:
            raise KeyboardInterrupt

    bar_sps = "n/a"  # env-steps/s of the last log window, for the progress bar
    # The handlers first: a signal right after the progress's first line (the loop has
    # started, as far as the user sees) then stops at the first step's checkpoint.
    previous_handlers = install_stop_handlers(on_signal)  # (put back in the loop's finally)
    try:
        bar = Progress(cfg.total_steps, start_step, enabled=cfg.progress)
    except BaseException:
        restore_handlers(previous_handlers)
        raise
    t_start = time.perf_counter()
    t_last, step_last = t_start, start_step
    step = start_step
    metrics: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ the loop
    try:
        for step in range(start_step + 1, cfg.total_steps + 1):
            # Act: uniform random during warm-up, then the stochastic policy.
            if step <= cfg.warmup_steps:
                u = torch.rand(num_tasks, envs.act_dim, generator=action_gen, device=device)
                action = envs.action_low + u * (envs.action_high - envs.action_low)
            else:
                action = agent.act(obs)

            # Step all tasks; store the true final observation, bootstrap through time limits.
            try:
                out = envs.step(action)
            except Exception:
                if not interrupted:
                    raise
                # A stop signal sent to the whole process group (a scheduler's SIGTERM)
                # also killed the env workers: this step did not happen, but everything
                # up to the previous one is intact and is checkpointed below.
                step -= 1
                break
            buffer.add(obs, action, out.reward, out.next_obs, out.terminated.float())
            obs = out.obs
            ep_return += out.reward
            ep_success |= out.success
            ended = (out.terminated | out.truncated).float()
            done_return += ended * ep_return
            done_success += ended * ep_success.float()
            done_count += ended
            ep_return *= 1 - ended
            ep_success &= ~ended.bool()

            # Update: one (or updates_per_step) SAC update(s) per vector-env step.
            log_now = step % cfg.log_every == 0 or step == cfg.total_steps
            if step > updates_from:
                # Gradient statistics (cosines, conflicts) cost a Gramian: only when logged.
                agent.diagnostics = log_now
                for _ in range(cfg.updates_per_step):
                    metrics = agent.update(buffer.sample(cfg.batch_size, cfg.stratified))
                    skips.add(metrics["skipped"])
            # Skips are read back every step when the agent reads its flags anyway ("sync"
            # guard), else only where the loop syncs: logs, checkpoints, the end.
            if (not agent.masked_guard or log_now or step % cfg.checkpoint_every == 0
                    or step == cfg.total_steps):
                skipped_total = skips.check(step, ckpt_path)

            # Log: the only place where update metrics become host numbers.
            if log_now:
                now = time.perf_counter()
                sps = (step - step_last) * num_tasks / max(now - t_last, 1e-9)
                t_last, step_last = now, step
                # Means over the tasks that finished an episode in this window (None if
                # none did): a task without a finished episode is not a 0.
                ended_tasks = done_count > 0
                n_ended = int(ended_tasks.sum())
                per_task = done_count.clamp(min=1)
                record = {
                    "step": step,
                    "env_steps": step * num_tasks,
                    "env_steps_per_s": sps,
                    "skipped_updates": skipped_total,
                    "train_return": (done_return / per_task)[ended_tasks].mean().item()
                    if n_ended else None,
                    "train_success": (done_success / per_task)[ended_tasks].mean().item()
                    if n_ended else None,
                    "train_episodes": int(done_count.sum().item()),
                    "train_tasks_ended": n_ended,
                } | _to_python(metrics)
                done_return.zero_(), done_success.zero_(), done_count.zero_()
                log.write("metrics.jsonl", record)
                bar_sps = f"{sps:.0f}"
                bar.set_postfix(env_sps=bar_sps, success=_success_text(last_eval))

            # Evaluations and checkpoints do not count in the next window's env-steps/s
            # (result.json's whole-run figure includes them).
            t_pause = time.perf_counter()
            if cfg.eval_every and step % cfg.eval_every == 0:
                try:
                    last_eval = run_eval(step)
                except Exception:
                    if not interrupted:
                        raise
                    # (the eval workers died of a group-wide stop signal: checkpoint
                    # without this evaluation; a resumed run evaluates at its end)
                else:
                    # (the new result now, not at the next log)
                    bar.set_postfix(env_sps=bar_sps, success=_success_text(last_eval))
            if step % cfg.checkpoint_every == 0:
                checkpoint(step)
            t_last += time.perf_counter() - t_pause
            bar.update(1)
            if interrupted:
                break

        # ------------------------------------------------------------------ wrap-up
        if not interrupted and (last_eval is None or last_eval["step"] != step):
            last_eval = run_eval(step)
        checkpoint(step)
        if interrupted and cfg.progress:
            bar.write(f"interrupted: checkpoint written at step {step} to {ckpt_path}")
        if not interrupted:
            # result.json marks a finished run (benchmarks skip runs that have one).
            wall = time.perf_counter() - t_start
            atomic_write_json(run_dir / "result.json", {
                "step": step,
                "env_steps": step * num_tasks,
                "wall_clock_s": wall_before + wall,
                # over the whole run, all sessions (evaluations included)
                "env_steps_per_s": step * num_tasks / max(wall_before + wall, 1e-9),
                "resumed_from_step": start_step if resume else None,
                "skipped_updates": skipped_total,
                "final_eval": last_eval,
            })
    finally:
        restore_handlers(previous_handlers)
        bar.close()
        log.close()
        for venv in (envs, eval_envs):
            if venv is None:
                continue
            try:
                venv.close()
            except Exception as exc:  # noqa: BLE001 - never mask the run's own outcome
                # (workers killed by a group-wide stop signal cannot be closed politely;
                # the checkpoint and logs are already written)
                warnings.warn(f"closing the environments failed: {type(exc).__name__}: "
                              f"{exc}", stacklevel=2)
    return TrainResult(run_dir, step, last_eval, skipped_total, interrupted)
