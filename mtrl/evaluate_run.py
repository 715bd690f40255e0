"""Evaluate a finished (or interrupted) run from its checkpoint."""

from __future__ import annotations

import csv
import io
import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

from mtrl.checkpoint import (
    CheckpointError,
    atomic_write_json,
    atomic_write_text,
    load_checkpoint,
)
from mtrl.config import ConfigError, read_run_config
from mtrl.progress import evaluation_progress, status
from mtrl.runtime import configure_cpu, first_line, whole_message


def _locate(path: str | Path) -> tuple[Path, Path]:
    """(run_dir, checkpoint file) from either of them."""
    from mtrl.trainer import CHECKPOINT_NAME

    p = Path(path)
    if p.is_dir():
        if not (p / CHECKPOINT_NAME).is_file():
            raise CheckpointError(
                f"no {CHECKPOINT_NAME} in {str(p)!r}: not a run directory, or the run has not "
                "written a checkpoint yet"
            )
        return p, p / CHECKPOINT_NAME
    if p.is_file():
        return p.parent, p
    raise CheckpointError(f"{str(p)!r} is neither a run directory nor a checkpoint file")


def evaluate_run(
    path: str | Path,
    episodes_per_task: int | None = None,
    protocol: str | None = None,
    device: str = "auto",
    out_dir: str | Path | None = None,
    progress: bool = False,
) -> tuple[dict[str, Any], list[Path]]:
    """Evaluate the policy in a checkpoint; write ``eval_<step>.json`` and ``.csv``
    (``eval_<step>_<protocol>_<N>ep.*`` for another protocol or episode count than the
    run's own evaluation). By default the run's own evaluation is repeated: its protocol
    and episode count (``eval_episodes``); another ``protocol`` defaults to that
    protocol's episode count. ``progress``: show a progress bar on stderr."""
    from mtrl.agents.sac import MultiTaskSAC
    from mtrl.balancers import build
    from mtrl.envs import PROTOCOLS, eval_env_config, eval_seed, evaluate, make_envs
    from mtrl.trainer import resolve_device

    run_dir, ckpt = _locate(path)
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{str(config_file)!r} not found next to the checkpoint "
                              f"{str(ckpt)!r} (is it an mtrl checkpoint in its run directory?)")
    cfg, _ = read_run_config(config_file)
    dev = resolve_device(device)
    configure_cpu(cfg.threads)
    protocol = protocol or cfg.protocol
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    # the run's own evaluation: its protocol with its episode count (eval_episodes, 0 =
    # the protocol's); another protocol defaults to that protocol's count
    run_episodes = cfg.eval_episodes or PROTOCOLS[cfg.protocol].episodes_per_task
    default = run_episodes if protocol == cfg.protocol else PROTOCOLS[protocol].episodes_per_task
    episodes = episodes_per_task or default
    state = load_checkpoint(ckpt, map_location="cpu")
    step = int(state["step"])
    out = Path(out_dir) if out_dir else run_dir
    # before the evaluation (minutes on MT50), not after it: where the results will go
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), out)
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"cannot write the evaluation into {str(out)!r}: {str(probe)!r} is "
                          "a file, not a directory")
    if not os.access(probe, os.W_OK):
        raise ConfigError(
            f"cannot write the evaluation into {str(out)!r} (read-only: "
            f"{str(probe)!r}); pass --out DIR to write it elsewhere"
        )

    eval_cfg = replace(eval_env_config(cfg.env, protocol), device=str(dev))
    if progress:
        status(f"building the {cfg.env.benchmark} environments ...")
    envs = make_envs(eval_cfg)
    try:
        agent_state = state["agent"]
        try:
            build(cfg.balancer, **cfg.balancer_kwargs)
            balancer = cfg.balancer, cfg.balancer_kwargs
        except ValueError as exc:
            # A plug-in that trained the run but is not installed here: the evaluation uses
            # the actor alone, so the balancers' state is left out instead.
            warnings.warn(f"{first_line(exc)}: evaluating without the balancer's state (the "
                          "evaluation does not use it)", stacklevel=2)
            balancer = "mean", {}
            agent_state = {k: v for k, v in agent_state.items()
                           if not k.startswith("balancers.")}
        agent = MultiTaskSAC(
            envs.obs_dim, envs.act_dim, envs.num_tasks, cfg.sac,
            lambda: build(balancer[0], **balancer[1]), device=dev,
        )
        try:
            agent.load_state_dict(agent_state)
        except (RuntimeError, KeyError) as exc:
            raise CheckpointError(
                f"checkpoint {str(ckpt)!r} does not match the run's config: "
                f"{type(exc).__name__}: {whole_message(exc)}"
            ) from exc
        # the run's own evaluation seed at this step: same protocol and episodes -> the
        # same numbers as the run's evaluation of this checkpoint
        with evaluation_progress(episodes, eval_cfg.max_episode_steps, progress) as on_step:
            result = evaluate(lambda o: agent.act(o, deterministic=True), envs, episodes,
                              seed=eval_seed(cfg.env.seed, step), on_step=on_step)
    finally:
        envs.close()

    record = {
        "step": step,
        "protocol": protocol,
        "episodes_per_task": episodes,
        "mean_success": float(result.mean_success),
        "success": {k: float(v) for k, v in result.success_rate.items()},
        "return": {k: float(v) for k, v in result.mean_return.items()},
    }
    # the run's own evaluation keeps the plain name; another protocol or episode count
    # gets its own files instead of overwriting that one
    stem = f"eval_{step}"
    if protocol != cfg.protocol or episodes != run_episodes:
        stem += f"_{protocol}_{episodes}ep"
    json_path, csv_path = out / f"{stem}.json", out / f"{stem}.csv"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(json_path, record)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["task", "success_rate", "mean_return"])
    for task, value in record["success"].items():
        writer.writerow([task, value, record["return"][task]])
    atomic_write_text(csv_path, buf.getvalue())
    return record, [json_path, csv_path]
