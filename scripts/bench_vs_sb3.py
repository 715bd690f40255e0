"""End-to-end MT10 training throughput: ``mtrl train`` (balancer ``mean``) vs stable-baselines3 SAC.

Both learners train on the same ten Meta-World v3 MT10 environments (the ``mtrl``
protocol training env: fixed goal per task, 150-step episodes, raw observation + task
one-hot = 49 dims), on the CPU, with the same torch thread count, and with matching
settings:

| setting | mtrl | SB3 SAC |
|---|---|---|
| networks | actor 3×400, twin critic 3×400 | ``net_arch=[400, 400, 400]`` (pi and qf) |
| batch | 1280 (128 per task, stratified) | 1280 (uniform over the buffer) |
| warm-up | ``warmup_steps=W`` random vector steps | ``learning_starts=10*W`` (env-steps) |
| updates | 1 per vector-env step (10 transitions) | ``train_freq=1``, ``gradient_steps=1`` |
| replay | ``buffer_capacity`` transitions | ``buffer_size`` transitions |
| optimiser | Adam 3e-4, γ 0.99, τ 0.005, auto temperature, target entropy -4 | same |

Update-to-data ratio. SB3's ``OffPolicyAlgorithm.learn`` loops: collect ``train_freq``
steps of the *vector* env (one ``env.step`` call = ``n_envs`` = 10 transitions, and
``num_timesteps`` grows by 10), then, once ``num_timesteps > learning_starts``, run
``gradient_steps`` updates. With ``train_freq=1`` and ``gradient_steps=1`` that is one
update of batch 1280 per 10 transitions -- exactly what ``mtrl train`` does
(``updates_per_step=1``). SB3 acts randomly while ``num_timesteps < learning_starts``, so
``learning_starts = 10 * W`` gives W random vector steps and the first update after vector
step W + 1, as in mtrl. The script checks this: SB3's update counter must be 0 after the
warm-up and equal to the timed vector steps after the timed window; mtrl's metrics record
must show the expected step.

Environments. The SB3 side reuses the very sub-environments our ``mtrl.envs.make_envs``
builds (``gymnasium.make_vec("Meta-World/MT10", ...)``, sync strategy, one-hot wrapper
included), wrapped in SB3's ``DummyVecEnv``: the same simulators, goals, time limits and
observations. SB3's ``DummyVecEnv`` handles time-limit truncation itself
(``TimeLimit.truncated`` / ``terminal_observation``), like our vector env does.

What is timed (wall clock, ``time.perf_counter``), for both: N vector-env steps after the
W warm-up steps, i.e. N × (act with the policy, step the 10 envs, store, sample a batch
of 1280, one full SAC update). Not timed: building the environments, the agent and the
buffer, the warm-up steps, and mtrl's closing evaluation and checkpoint.

* SB3: ``model.learn(10 * W)`` (warm-up, untimed), then ``model.learn(10 * N,
  reset_num_timesteps=False)`` timed as a whole (it continues the running episodes).
* mtrl: one ``mtrl.trainer.train(TrainConfig(...))`` call with ``total_steps = W + N``.
  The training env's ``step`` is instrumented (through ``train``'s ``env_factory``
  argument) to stamp the time when the loop starts (first step call) and when warm-up
  step W returns; ``log_every = W + N`` makes the trainer write exactly one
  ``metrics.jsonl`` record, at the last step, right after the last update and *before*
  the final evaluation; its ``env_steps_per_s`` gives the loop's total time since the
  loop started, ``(W + N) * 10 / env_steps_per_s``. Timed = that total minus the stamped
  warm-up time. That one logged update also computes gradient diagnostics (a Gramian),
  a cost SB3 does not pay; it is included (it only makes mtrl look slower).

Not identical, by design of the two libraries (so the comparison is of two complete
"train MT10 with SAC" implementations, not of identical arithmetic): mtrl keeps one
temperature per task and computes per-task loss vectors (the balancer interface) where SB3
has one temperature and plain batch means; mtrl evaluates the twin critic in one batched
pass where SB3 runs two networks; mtrl samples stratified batches, SB3 uniform ones.

Target: mtrl >= 1.5× SB3 env-steps/s.

Usage:

    python scripts/bench_vs_sb3.py                   # 200 warm-up + 600 timed vector steps each
    python scripts/bench_vs_sb3.py --steps 1000 --threads 2 --repeats 2
    python scripts/bench_vs_sb3.py --quick           # a smoke run (numbers not meaningful)

Prints a Markdown table (framework, vector steps, env-steps, seconds, env-steps/s,
ratio mtrl/SB3) and the machine (torch version, threads, CPUs, load average). Other
processes on the machine slow both sides; run it on an idle machine and compare the load
averages printed before and after.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from mtrl import onednn
from mtrl.agents.sac import SACConfig
from mtrl.config import TrainConfig
from mtrl.envs import EnvConfig, MultiTaskVecEnv, make_envs
from mtrl.runtime import configure_cpu
from mtrl.trainer import train

HIDDEN = (400, 400, 400)
LR, GAMMA, TAU = 3e-4, 0.99, 0.005


@dataclass
class Timing:
    framework: str
    vec_steps: int
    env_steps: int
    updates: int
    seconds: float

    @property
    def env_steps_per_s(self) -> float:
        return self.env_steps / self.seconds


def env_config(args: argparse.Namespace) -> EnvConfig:
    """The ``mtrl`` protocol's MT10 training env."""
    return EnvConfig(
        benchmark="MT10",
        seed=args.seed,
        vector_strategy="sync",
        max_episode_steps=150,
        goal_mode="fixed",
        device="cpu",
    )


def parse_balance(text: str) -> tuple[str, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    return tuple(x.strip() for x in text.split(",") if x.strip())


# ---------------------------------------------------------------------------- mtrl
class _StampedFactory:
    """``env_factory`` for ``train``: builds envs with ``make_envs`` and instruments the
    first one (the training env) to record the loop start and the end of warm-up."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.built = 0
        self.t_first: float | None = None
        self.t_warm: float | None = None
        self.calls = 0

    def __call__(self, cfg: EnvConfig) -> MultiTaskVecEnv:
        envs = make_envs(cfg)
        self.built += 1
        if self.built == 1:
            inner_step = envs.step

            def step(actions: Any) -> Any:
                if self.calls == 0:
                    self.t_first = time.perf_counter()
                out = inner_step(actions)
                self.calls += 1
                if self.calls == self.warmup:
                    self.t_warm = time.perf_counter()
                return out

            envs.step = step  # type: ignore[method-assign]
        return envs


def run_mtrl(args: argparse.Namespace, steps: int, warmup: int) -> Timing:
    total = warmup + steps
    with tempfile.TemporaryDirectory(prefix="bench_vs_sb3_mtrl_") as tmp:
        cfg = TrainConfig(
            env=env_config(args),
            sac=SACConfig(hidden_sizes=HIDDEN, actor_lr=LR, critic_lr=LR, alpha_lr=LR,
                          gamma=GAMMA, tau=TAU, balance=parse_balance(args.balance)),
            balancer="mean",
            total_steps=total,
            warmup_steps=warmup,
            updates_per_step=1,
            batch_size=args.batch_size,
            buffer_capacity=args.buffer_size,
            eval_every=0,
            log_every=total,
            checkpoint_every=total,
            save_buffer=False,
            device="cpu",
            threads=args.threads,
            run_dir=str(Path(tmp) / "run"),
            progress=False,
        )
        factory = _StampedFactory(warmup)
        result = train(cfg, env_factory=factory)
        records = [json.loads(line)
                   for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    if result.steps != total or len(records) != 1 or records[0]["step"] != total:
        raise RuntimeError(f"unexpected mtrl run: {result.steps} steps, records {records}")
    if factory.t_first is None or factory.t_warm is None or factory.calls != total:
        raise RuntimeError(f"env instrumentation saw {factory.calls} steps, expected {total}")
    k = 10
    loop_s = total * k / records[0]["env_steps_per_s"]
    timed = loop_s - (factory.t_warm - factory.t_first)
    label = "mtrl (mean)" if onednn.enabled() else "mtrl (mean, torch products)"
    return Timing(label, steps, steps * k, steps, timed)


def run_mtrl_torch(args: argparse.Namespace, steps: int, warmup: int) -> Timing:
    """mtrl with torch's own float32 products instead of oneDNN's."""
    was = onednn.enabled()
    onednn.set_enabled(False)
    try:
        return run_mtrl(args, steps, warmup)
    finally:
        onednn.set_enabled(was)


# ---------------------------------------------------------------------------- SB3
def run_sb3(args: argparse.Namespace, steps: int, warmup: int) -> Timing:
    from stable_baselines3 import SAC
    from stable_baselines3.common.vec_env import DummyVecEnv

    configure_cpu(args.threads)
    ours = make_envs(env_config(args))  # the same sub-envs mtrl trains on
    try:
        k = ours.num_tasks
        sub_envs = list(ours.venv.envs)  # type: ignore[attr-defined]  (SyncVectorEnv)
        venv = DummyVecEnv([lambda e=e: e for e in sub_envs])
        model = SAC(
            "MlpPolicy",
            venv,
            learning_rate=LR,
            buffer_size=args.buffer_size,
            learning_starts=warmup * k,
            batch_size=args.batch_size,
            tau=TAU,
            gamma=GAMMA,
            train_freq=(1, "step"),
            gradient_steps=1,
            ent_coef="auto",
            target_entropy="auto",
            policy_kwargs=dict(net_arch=list(HIDDEN)),
            device="cpu",
            seed=args.seed,
            verbose=0,
        )
        if torch.get_num_threads() != args.threads:
            raise RuntimeError(f"SB3 changed torch threads to {torch.get_num_threads()}")
        model.learn(total_timesteps=warmup * k, progress_bar=False)  # random actions only
        if model._n_updates != 0 or model.num_timesteps != warmup * k:
            raise RuntimeError(f"SB3 warm-up did {model._n_updates} updates, "
                               f"{model.num_timesteps} env-steps")
        t0 = time.perf_counter()
        model.learn(total_timesteps=steps * k, reset_num_timesteps=False, progress_bar=False)
        seconds = time.perf_counter() - t0
        done_steps = model.num_timesteps - warmup * k
        if model._n_updates != steps or done_steps != steps * k:
            raise RuntimeError(
                f"SB3 did {model._n_updates} updates over {done_steps} env-steps; expected "
                f"{steps} updates over {steps * k} (one update per vector step)"
            )
        del model
    finally:
        ours.close()
    return Timing(f"SB3 {metadata.version('stable_baselines3')} SAC", steps, steps * k, steps,
                  seconds)


# ---------------------------------------------------------------------------- report
def machine_info(args: argparse.Namespace) -> list[str]:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count() or 0
    versions = ", ".join(
        f"{name} {metadata.version(name)}"
        for name in ("stable_baselines3", "gymnasium", "metaworld", "numpy")
    )
    return [
        f"torch {torch.__version__}, {torch.get_num_threads()} torch thread(s) "
        f"(--threads {args.threads}), device cpu; mtrl's oneDNN products: "
        f"{'on' if onednn.enabled() else 'off'}",
        f"{os.cpu_count()} CPUs ({affinity} usable), "
        f"{platform.processor() or platform.machine()}, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}",
        versions,
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=None,
                   help="timed vector-env steps (= updates) per framework (default 600)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed random-action vector steps first (default 200)")
    p.add_argument("--threads", type=int, default=1, help="torch threads, both sides (default 1)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 10 timed steps after 20 warm-up steps")
    p.add_argument("--repeats", type=int, default=1,
                   help="run both frameworks this many times (alternating); medians reported")
    p.add_argument("--frameworks", nargs="+", choices=["mtrl", "mtrl-torch", "sb3"],
                   default=["mtrl", "mtrl-torch", "sb3"],
                   help="mtrl: as shipped (oneDNN float32 products, mtrl.onednn); "
                   "mtrl-torch: with torch's own products (as MTRL_ONEDNN=0); sb3: SB3 SAC")
    p.add_argument("--batch-size", type=int, default=1280)
    p.add_argument("--buffer-size", type=int, default=1_000_000,
                   help="replay capacity in transitions, all tasks (default 1e6)")
    p.add_argument("--balance", default="critic,actor,alpha",
                   help="mtrl losses put through the (mean) balancer; 'none' = plain batch "
                        "means, the closest to SB3's arithmetic (default: all three)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    steps = args.steps if args.steps is not None else (10 if args.quick else 600)
    warmup = args.warmup if args.warmup is not None else (20 if args.quick else 200)
    if steps < 1 or warmup < 1 or args.threads < 1 or args.repeats < 1:
        p.error("--steps, --warmup, --threads and --repeats must be >= 1")
    if args.batch_size % 10:
        p.error("--batch-size must be divisible by the 10 MT10 tasks")
    configure_cpu(args.threads)

    load_start = os.getloadavg()
    print("# MT10 training throughput: mtrl vs stable-baselines3 SAC\n")
    for line in machine_info(args):
        print(f"- {line}")
    print(f"- load average at start: {' '.join(f'{x:.2f}' for x in load_start)}")
    print(f"- MT10 (mtrl protocol env: fixed goals, 150-step episodes, sync), batch "
          f"{args.batch_size}, 3×400 nets, buffer {args.buffer_size:,}, 1 update per vector "
          f"step, {warmup} warm-up + {steps} timed vector steps, mtrl balance="
          f"{parse_balance(args.balance) or 'none'}")
    print("- timed: the vector steps after warm-up (act, step 10 envs, store, sample, update); "
          "not timed: env/agent construction, warm-up, mtrl's final eval + checkpoint\n",
          flush=True)

    runners = {"mtrl": run_mtrl, "mtrl-torch": run_mtrl_torch, "sb3": run_sb3}
    order = list(dict.fromkeys(args.frameworks))
    results: dict[str, list[Timing]] = {name: [] for name in order}
    for r in range(args.repeats):
        for name in order if r % 2 == 0 else order[::-1]:
            t = runners[name](args, steps, warmup)
            results[name].append(t)
            print(f"  run {r + 1}/{args.repeats} {t.framework}: {t.seconds:.1f} s, "
                  f"{t.env_steps_per_s:,.0f} env-steps/s", flush=True)
            gc.collect()

    summary = {
        name: replace(ts[0], seconds=statistics.median(t.seconds for t in ts))
        for name, ts in results.items()
    }
    sb3 = summary.get("sb3")
    what = "median of " + str(args.repeats) + " runs" if args.repeats > 1 else "one run"
    print(f"\n| framework | vec steps | env-steps | seconds ({what}) | env-steps/s | "
          "ms / vec step | ratio mtrl/SB3 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for t in summary.values():
        ratio = "" if sb3 is None else f"{t.env_steps_per_s / sb3.env_steps_per_s:.2f}"
        print(f"| {t.framework} | {t.vec_steps:,} | {t.env_steps:,} | {t.seconds:.1f} | "
              f"{t.env_steps_per_s:,.1f} | {1000 * t.seconds / t.vec_steps:.0f} | {ratio} |")
    if sb3 is not None and "mtrl" in summary:
        ratio = summary["mtrl"].env_steps_per_s / sb3.env_steps_per_s
        verdict = "met" if ratio >= 1.5 else "MISSED"
        print(f"\n- target mtrl >= 1.5× SB3: {ratio:.2f}× ({verdict})"
              + (" [--quick: not meaningful]" if args.quick else ""))
    print(f"- load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
