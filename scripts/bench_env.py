"""Environment and replay-buffer throughput.

Env: MT10 / MT50, sync vs async vector strategy, uniform random actions, measured through
``MultiTaskVecEnv.step`` (action transfer, packing, the one host->device copy included).
One vector step = K env-steps. Buffer (if ``mtrl.buffers.MultiTaskReplayBuffer`` exists):
``add`` of one (K, ...) transition and ``sample`` of a 1280 batch.

    python scripts/bench_env.py            # a few hundred steps per configuration
    python scripts/bench_env.py --quick    # fewer steps, just to see it work

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time

import torch

from mtrl.envs import EnvConfig, make_envs


def bench_env(benchmark: str, strategy: str, steps: int, warmup: int, args) -> dict:
    cfg = EnvConfig(
        benchmark=benchmark,
        vector_strategy=strategy,
        seed=args.seed,
        goal_mode=args.goal_mode,
        max_episode_steps=args.max_episode_steps,
        device=args.device,
    )
    t0 = time.perf_counter()
    envs = make_envs(cfg)
    build_s = time.perf_counter() - t0
    try:
        k, gen = envs.num_tasks, torch.Generator(device=envs.device).manual_seed(args.seed)
        span = envs.action_high - envs.action_low

        def act() -> torch.Tensor:
            u = torch.rand(k, envs.act_dim, generator=gen, device=envs.device)
            return envs.action_low + u * span

        envs.reset()
        for _ in range(warmup):
            envs.step(act())
        if envs.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            out = envs.step(act())
        if envs.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        assert out.obs.shape == (k, envs.obs_dim)
        # (every env ends its episode at the same step: steps that are multiples of it)
        ends = (warmup + steps) // args.max_episode_steps - warmup // args.max_episode_steps
    finally:
        envs.close()
    return {
        "what": f"env {benchmark} {strategy}",
        "K": k,
        "build_s": build_s,
        "per_s": steps / dt,
        "rows_per_s": steps * k / dt,
        "note": f"{steps} vector steps, {args.max_episode_steps}-step episodes, "
                f"{ends} episode end(s) with their resets timed",
    }


def bench_buffer(k: int, steps: int, args) -> list[dict]:
    try:
        from mtrl.buffers import MultiTaskReplayBuffer
    except ImportError:
        return []
    obs_dim, act_dim = 39 + k, 4
    dev = torch.device(args.device)
    buf = MultiTaskReplayBuffer(max(1, args.buffer_capacity // k), k, obs_dim, act_dim, dev)
    o = torch.randn(k, obs_dim, device=dev)
    a = torch.rand(k, act_dim, device=dev)
    r = torch.randn(k, device=dev)
    d = torch.zeros(k, device=dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(max(steps // 10, 10)):  # warm-up / pre-fill
        buf.add(o, a, r, o, d)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        buf.add(o, a, r, o, d)
    sync()
    add_dt = time.perf_counter() - t0
    rows = [
        {
            "what": f"buffer add K={k}",
            "K": k,
            "build_s": float("nan"),
            "per_s": steps / add_dt,
            "rows_per_s": steps * k / add_dt,
            "note": f"capacity {args.buffer_capacity // k}/task",
        }
    ]
    # Sampling gathers from the whole buffer: time it full, as in a long run (random
    # contents; the nearly empty buffer above stays in cache and samples 3-8x faster)
    for field in (buf.obs, buf.action, buf.reward, buf.next_obs):
        field.normal_()
    buf.size.fill_(buf.capacity)
    buf.pos.zero_()
    for stratified in (True, False):
        batch = args.batch_size - (args.batch_size % k if stratified else 0)
        for _ in range(10):
            buf.sample(batch, stratified=stratified)
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            b = buf.sample(batch, stratified=stratified)
        sync()
        dt = time.perf_counter() - t0
        assert b.obs.shape == (batch, obs_dim)
        rows.append(
            {
                "what": f"buffer sample K={k} {'stratified' if stratified else 'uniform'}",
                "K": k,
                "build_s": float("nan"),
                "per_s": steps / dt,
                "rows_per_s": steps * batch / dt,
                "note": f"batch {batch}, buffer full ({buf.capacity}/task)",
            }
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer steps (smoke run)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--benchmarks", nargs="+", default=["MT10", "MT50"])
    p.add_argument("--strategies", nargs="+", default=["sync", "async"])
    p.add_argument("--steps", type=int, default=None, help="timed vector steps per config")
    p.add_argument("--warmup", type=int, default=None, help="untimed vector steps first")
    p.add_argument("--goal-mode", default="random", choices=["random", "fixed"])
    p.add_argument("--max-episode-steps", type=int, default=500)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1280)
    p.add_argument("--buffer-capacity", type=int, default=1_000_000, help="total, all tasks")
    p.add_argument("--buffer-steps", type=int, default=None)
    p.add_argument("--no-buffer", action="store_true")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    # (default: one whole episode, so its reset is timed in proportion)
    steps = args.steps or (100 if args.quick else args.max_episode_steps)
    warmup = args.warmup if args.warmup is not None else (10 if args.quick else 50)
    buffer_steps = args.buffer_steps or (200 if args.quick else 2000)

    load_start = os.getloadavg()[0]
    rows: list[dict] = []
    for bench in args.benchmarks:
        for strategy in args.strategies:
            rows.append(bench_env(bench, strategy, steps, warmup, args))
    if not args.no_buffer:
        for k in sorted({len(EnvConfig(benchmark=b).task_names) for b in args.benchmarks}):
            rows.extend(bench_buffer(k, buffer_steps, args))

    print(
        f"\ntorch {torch.__version__}, {args.threads} thread(s), device {args.device}, "
        f"{platform.processor() or platform.machine()}, goal_mode {args.goal_mode}\n"
    )
    print("| what | K | build s | calls/s | env-steps (rows)/s | notes |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        build = "" if math.isnan(r["build_s"]) else f"{r['build_s']:.1f}"
        print(
            f"| {r['what']} | {r['K']} | {build} | {r['per_s']:,.0f} | {r['rows_per_s']:,.0f} "
            f"| {r['note']} |"
        )
    print(
        "\ncalls/s: vector steps/s for env rows (one call steps all K tasks), add or sample "
        "calls/s for buffer rows; rows/s: env-steps/s, transitions added/s, or rows sampled/s."
    )
    print(f"\n- load average at start: {load_start:.2f}, at end: {os.getloadavg()[0]:.2f} "
          "(other processes make timings noisy)")


if __name__ == "__main__":
    main()
