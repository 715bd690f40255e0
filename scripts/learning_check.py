"""Evidence that training learns, on a CPU, in minutes.

Part A -- one easy task. MT1 ``reach-v3`` (``mtrl`` protocol env: fixed goal, 150-step
episodes, observation = 39 Meta-World dims + a 1-dim task one-hot), trained with
``mtrl.trainer.train`` and settings chosen for a fast CPU run: 2×256 MLPs, batch 256,
1000 warm-up steps, 30 000 steps, an evaluation every 500 steps (about 5 minutes on
one idle core, measured 2026-11-28; a 15 000-step run reached evaluation returns of
~1,200 but no success, the first successes came after ~16 000 steps). Because the goal
and the initial state are fixed and the evaluation policy is deterministic, one
evaluation episode decides a task (the ``mtrl`` protocol's 1 episode per task), so the
success curve is 0/1 per point;
the evaluation return and the training-episode success (stochastic policy, from
``metrics.jsonl``) are printed beside it. PASS (A): the best evaluation success >=
``--threshold`` (default 0.8); the final one is printed too.

Part B -- MT10, short. The ``mtrl`` protocol MT10 env, balancer ``mean``, the published
network and batch (3×400, 1280), 500 warm-up steps, 4000 steps, an evaluation every 500
steps (1 deterministic episode per task); about 5 minutes on one idle core (measured
2026-11-28). A uniform random policy is evaluated on the same evaluation envs (as many
evaluations as the trained run made, 1 episode per task each). PASS (B): the run's best
mean success > the random policy's mean success. A stricter line (best vs the random
policy's *best* evaluation, max against max) is printed for information.

Both parts read the evaluations from the run's ``eval.jsonl`` (records with ``step``,
``env_steps``, ``mean_success``, ``success`` per task, ``return`` per task) and the
training-episode statistics from ``metrics.jsonl``, print the curves as Markdown tables
and save one PNG with the curves (``--out``) plus a JSON summary next to it.

Usage:

    python scripts/learning_check.py                     # parts A and B (~5 + ~5 min, 1 thread)
    python scripts/learning_check.py --part a            # reach only
    python scripts/learning_check.py --quick --out /tmp/lc.png   # smoke run, not meaningful
    python scripts/learning_check.py --keep-runs runs/learning_check   # keep the run dirs

Exit status 1 if a check fails (not with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mtrl.agents.sac import SACConfig
from mtrl.config import TrainConfig
from mtrl.envs import EnvConfig, eval_env_config, evaluate, make_envs
from mtrl.trainer import train


@dataclass
class PartSpec:
    name: str
    env: EnvConfig
    steps: int
    warmup: int
    eval_every: int
    hidden: tuple[int, ...]
    batch_size: int
    init_temperature: float = 1.0


@dataclass
class PartResult:
    spec: PartSpec
    evals: list[dict[str, Any]]
    metrics: list[dict[str, Any]]
    random_success: list[float]
    wall_s: float
    task_names: list[str] = field(default_factory=list)

    @property
    def curve(self) -> list[float]:
        return [float(e["mean_success"]) for e in self.evals]

    @property
    def best(self) -> float:
        return max(self.curve, default=float("nan"))

    @property
    def final(self) -> float:
        return self.curve[-1] if self.curve else float("nan")

    @property
    def random_mean(self) -> float:
        return sum(self.random_success) / max(len(self.random_success), 1)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def parse_hidden(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def random_policy_success(env_cfg: EnvConfig, evaluations: int, seed: int) -> list[float]:
    """Mean success of a uniform random policy, ``evaluations`` times, on the run's
    evaluation envs (``mtrl`` protocol, 1 episode per task per evaluation)."""
    envs = make_envs(eval_env_config(env_cfg, "mtrl"))
    try:
        gen = torch.Generator().manual_seed(seed)
        low, span = envs.action_low, envs.action_high - envs.action_low

        def policy(obs: Tensor) -> Tensor:
            u = torch.rand(obs.shape[0], envs.act_dim, generator=gen)
            return low + u * span

        return [float(evaluate(policy, envs, episodes_per_task=1, seed=seed + i).mean_success)
                for i in range(evaluations)]
    finally:
        envs.close()


def run_part(spec: PartSpec, args: argparse.Namespace, root: Path) -> PartResult:
    run_dir = root / spec.name
    cfg = TrainConfig(
        env=spec.env,
        sac=SACConfig(hidden_sizes=spec.hidden, init_temperature=spec.init_temperature),
        balancer="mean",
        total_steps=spec.steps,
        warmup_steps=spec.warmup,
        batch_size=spec.batch_size,
        buffer_capacity=max(spec.steps * len(spec.env.task_names), 1000, spec.batch_size),
        protocol="mtrl",
        eval_every=spec.eval_every,
        log_every=spec.eval_every,
        checkpoint_every=spec.steps,
        save_buffer=False,
        device="cpu",
        threads=args.threads,
        run_dir=str(run_dir),
        progress=not args.no_progress,
    )
    print(f"\n## {spec.name}: {len(spec.env.task_names)} task(s), {spec.steps} steps "
          f"({spec.warmup} warm-up), eval every {spec.eval_every}, nets {spec.hidden}, "
          f"batch {spec.batch_size}; run dir {run_dir}", flush=True)
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    evals = read_jsonl(run_dir / "eval.jsonl")
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    task_names = list(evals[-1]["success"]) if evals else spec.env.task_names
    rand = random_policy_success(spec.env, max(len(evals), 1), seed=args.seed + 12345)
    return PartResult(spec, evals, metrics, rand, wall, task_names)


def print_curve(res: PartResult) -> None:
    train_success = {m["step"]: m.get("train_success") for m in res.metrics}
    k = len(res.task_names)
    short = [t.removesuffix("-v3") for t in res.task_names]
    per_task = k > 1
    head = "| step | env-steps | eval success | eval return | train success |"
    sep = "|---:|---:|---:|---:|---:|"
    if per_task:
        head += " " + " | ".join(short) + " |"
        sep += "---:|" * k
    print(f"\n{head}\n{sep}")
    for e in res.evals:
        ret = sum(e["return"].values()) / max(len(e["return"]), 1)
        ts = train_success.get(e["step"])
        row = (f"| {e['step']} | {e['env_steps']:,} | {e['mean_success']:.2f} | {ret:.0f} | "
               f"{'' if ts is None else f'{ts:.2f}'} |")
        if per_task:
            row += " " + " | ".join(f"{e['success'][t]:.0f}" for t in res.task_names) + " |"
        print(row)
    rs = res.random_success
    print(f"\nrandom policy ({len(rs)} evaluation(s), 1 episode per task each): mean success "
          f"{res.random_mean:.3f}, best {max(rs, default=float('nan')):.2f}; trained: best "
          f"{res.best:.2f}, final {res.final:.2f}; wall clock {res.wall_s:.0f} s", flush=True)


def plot(results: list[PartResult], out: Path, threshold: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        x = [e["env_steps"] for e in res.evals]
        k = len(res.task_names)
        if k > 1:
            for t in res.task_names:
                ax.plot(x, [e["success"][t] for e in res.evals], lw=0.8, alpha=0.35)
        ax.plot(x, res.curve, "o-", color="black", lw=2, label="eval success (mean over tasks)")
        tm = [(m["env_steps"], m["train_success"]) for m in res.metrics
              if m.get("train_episodes", 0) > 0]
        if tm:
            ax.plot(*zip(*tm, strict=True), "s--", color="tab:blue", lw=1.2,
                    label="training-episode success")
        ax.axhline(res.random_mean, color="tab:red", ls=":", lw=1.5,
                   label=f"random policy ({res.random_mean:.2f})")
        if k == 1:
            ax.axhline(threshold, color="gray", ls="--", lw=0.8, label=f"threshold {threshold}")
        ax.axvline(res.spec.warmup * k, color="gray", lw=0.6)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("env-steps (all tasks)")
        ax.set_ylabel("success rate")
        ax.set_title(f"{res.spec.name}: {', '.join(res.task_names) if k == 1 else f'MT{k}'}"
                     f", mean balancer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--part", choices=["a", "b", "both"], default="both")
    p.add_argument("--quick", action="store_true", help="tiny budgets: a smoke run only")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", type=Path, default=Path("docs/learning_check.png"),
                   help="PNG with the curves (a .json summary is written beside it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threshold", type=float, default=0.8, help="part A success threshold")
    p.add_argument("--steps-a", type=int, default=None, help="part A steps (default 30000)")
    p.add_argument("--warmup-a", type=int, default=None, help="part A warm-up (default 1000)")
    p.add_argument("--eval-every-a", type=int, default=None, help="default 500")
    p.add_argument("--hidden-a", default="256,256", help="part A hidden sizes")
    p.add_argument("--batch-a", type=int, default=256, help="part A batch size")
    p.add_argument("--init-temp-a", type=float, default=1.0,
                   help="part A initial entropy temperature (default 1.0, as MT10)")
    p.add_argument("--steps-b", type=int, default=None, help="part B steps (default 4000)")
    p.add_argument("--warmup-b", type=int, default=None, help="part B warm-up (default 500)")
    p.add_argument("--eval-every-b", type=int, default=None, help="default 500")
    p.add_argument("--hidden-b", default="400,400,400", help="part B hidden sizes")
    p.add_argument("--batch-b", type=int, default=1280, help="part B batch size")
    p.add_argument("--keep-runs", type=Path, default=None,
                   help="write the run dirs here (default: a temporary dir, deleted)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args()
    if args.threads < 1:
        p.error("--threads must be >= 1")
    torch.set_num_threads(args.threads)

    def pick(value: int | None, full: int, quick: int) -> int:
        return value if value is not None else (quick if args.quick else full)

    protocol_env = dict(seed=args.seed, max_episode_steps=150, goal_mode="fixed", device="cpu")
    specs: list[PartSpec] = []
    if args.part in ("a", "both"):
        specs.append(PartSpec(
            "A", EnvConfig(benchmark="MT1", task="reach-v3", **protocol_env),
            steps=pick(args.steps_a, 30_000, 60), warmup=pick(args.warmup_a, 1000, 30),
            eval_every=pick(args.eval_every_a, 500, 30), hidden=parse_hidden(args.hidden_a),
            batch_size=args.batch_a, init_temperature=args.init_temp_a,
        ))
    if args.part in ("b", "both"):
        specs.append(PartSpec(
            "B", EnvConfig(benchmark="MT10", **protocol_env),
            steps=pick(args.steps_b, 4000, 30), warmup=pick(args.warmup_b, 500, 15),
            eval_every=pick(args.eval_every_b, 500, 15), hidden=parse_hidden(args.hidden_b),
            batch_size=args.batch_b,
        ))

    print("# Learning check (CPU)\n")
    print(f"- torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} "
          f"CPUs, {platform.processor() or platform.machine()}, Python "
          f"{platform.python_version()}; load average {os.getloadavg()[0]:.2f}")
    print("- env: mtrl protocol (fixed goals, 150-step episodes), balancer mean; eval: "
          "1 deterministic episode per task")

    results: list[PartResult] = []
    with tempfile.TemporaryDirectory(prefix="learning_check_") as tmp:
        root = args.keep_runs if args.keep_runs is not None else Path(tmp)
        if args.keep_runs is not None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            root = root / stamp
        for spec in specs:
            res = run_part(spec, args, root)
            print_curve(res)
            results.append(res)

    verdicts: dict[str, bool] = {}
    print("\n## Checks\n")
    for res in results:
        if res.spec.name == "A":
            ok = res.best >= args.threshold
            verdicts["A"] = ok
            print(f"- {'PASS' if ok else 'FAIL'} (A): reach-v3 best eval success {res.best:.2f} "
                  f"{'>=' if ok else '<'} {args.threshold} (final {res.final:.2f}; random "
                  f"policy {res.random_mean:.2f})")
        else:
            ok = res.best > res.random_mean
            verdicts["B"] = ok
            strict = res.best > max(res.random_success, default=float("nan"))
            print(f"- {'PASS' if ok else 'FAIL'} (B): MT10 best mean success {res.best:.2f} "
                  f"{'>' if ok else '<='} random policy's mean success {res.random_mean:.3f} "
                  f"(final {res.final:.2f})")
            print(f"  (info, max vs max) best {res.best:.2f} "
                  f"{'>' if strict else '<='} random policy's best evaluation "
                  f"{max(res.random_success, default=float('nan')):.2f} over "
                  f"{len(res.random_success)} evaluation(s)")
    if args.quick:
        print("- --quick: budgets are far too small to learn; the verdicts are not meaningful")
    print(f"- load average at end: {os.getloadavg()[0]:.2f}")

    if results:
        plot(results, args.out, args.threshold)
        summary = {
            "quick": args.quick,
            "threads": args.threads,
            "torch": torch.__version__,
            "verdicts": verdicts,
            "parts": {
                r.spec.name: {
                    "tasks": r.task_names,
                    "steps": r.spec.steps,
                    "warmup": r.spec.warmup,
                    "eval_every": r.spec.eval_every,
                    "hidden_sizes": list(r.spec.hidden),
                    "batch_size": r.spec.batch_size,
                    "init_temperature": r.spec.init_temperature,
                    "wall_clock_s": round(r.wall_s, 1),
                    "eval_steps": [e["step"] for e in r.evals],
                    "eval_mean_success": r.curve,
                    "best": r.best,
                    "final": r.final,
                    "random_policy_success": r.random_success,
                    "random_policy_mean": r.random_mean,
                    "env": asdict(r.spec.env),
                }
                for r in results
            },
        }
        json_path = args.out.with_suffix(".json")
        json_path.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"- curves: {args.out}; summary: {json_path}")
    return 0 if args.quick or all(verdicts.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
