"""Milliseconds per full multi-task SAC update, per balancer, at K=10 and K=50.

One update = critic step + actor step + temperature step + Polyak update, on a stratified
batch of about 1280 transitions (task-major, 1280 // K per task: 1280 at K=10, 1250 at
K=50 as in the MT50 presets), 3×400 MLPs, observation 39 + K (Meta-World state + task
one-hot), action 4, all three losses balanced (the published setups). The batch comes
from a replay buffer filled with random transitions, so the numbers measure compute, not
learning. The agent runs with ``diagnostics=False``
as the trainer does on updates it does not log (cosines and conflict counts cost an extra
Gramian); ``--diagnostics`` times the logged updates instead.

Hyper-parameters follow the presets: MT10 cagrad c=0.9, sdmgrad-os 4 sampled tasks;
MT50 cagrad c=0.5, sdmgrad-os 8 sampled tasks; sdmgrad λ=0.6; fairgrad α=2.

Targets (issue #4): balanced update <= 1.3× the ``mean`` update at K=10 and <= 1.6× at
K=50; ``sdmgrad-os`` at K=50 <= 1.2×.

Both float32 CPU backends are timed in one run (``--backends``): ``onednn``, what mtrl's
layers and Gramians use by default (:mod:`mtrl.onednn`), and ``torch``, torch's own
products (MKL), as with ``MTRL_ONEDNN=0``. Ratios are within a backend.

Usage: ``python scripts/bench_update.py [--tasks 10 50] [--repeats 15] [--threads 1]``.
Timings are medians of wall-clock time; other processes on the machine make them noisy
(the load average is printed before and after).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import time

import torch

from mtrl import onednn
from mtrl.agents.sac import MultiTaskSAC, SACConfig
from mtrl.balancers import build
from mtrl.buffers import MultiTaskReplayBuffer
from mtrl.runtime import configure_cpu

OBS_BASE, ACT, BATCH = 39, 4, 1280
BALANCERS = ("mean", "cagrad", "fairgrad", "sdmgrad", "sdmgrad-os")
TARGETS = {10: 1.3, 50: 1.6}


def hparams(name: str, k: int) -> dict:
    """Preset hyper-parameters (configs/mt10_*.json, configs/mt50_*.json)."""
    return {
        "cagrad": {"c": 0.9 if k <= 10 else 0.5},
        "sdmgrad": {"lam": 0.6},
        "sdmgrad-os": {"lam": 0.6, "num_sampled": 4 if k <= 10 else 8, "seed": 0},
        "fairgrad": {"alpha": 2.0},
    }.get(name, {})


def filled_buffer(k: int, per_task: int = 2000) -> MultiTaskReplayBuffer:
    obs_dim = OBS_BASE + k
    buf = MultiTaskReplayBuffer(per_task, k, obs_dim, ACT, seed=0)
    gen = torch.Generator().manual_seed(0)
    onehot = torch.eye(k)
    for _ in range(per_task):
        obs = torch.cat([torch.randn(k, OBS_BASE, generator=gen), onehot], 1)
        nxt = torch.cat([torch.randn(k, OBS_BASE, generator=gen), onehot], 1)
        act = torch.rand(k, ACT, generator=gen) * 2 - 1
        buf.add(obs, act, torch.randn(k, generator=gen), nxt, torch.zeros(k))
    return buf


def time_updates(names: list[str], k: int, buf: MultiTaskReplayBuffer, repeats: int,
                 warmup: int, diagnostics: bool) -> dict[str, tuple[float, float, float]]:
    """Per balancer: (median ms, interquartile range ms, median ratio to ``mean``).

    One agent per balancer; each round runs one update of every agent in turn (same
    batch), so that drifts of the machine hit all of them alike; the ratio is the median
    over rounds of the ratio within a round.
    """
    agents = {}
    for name in names:
        torch.manual_seed(0)
        kwargs = hparams(name, k)
        agent = MultiTaskSAC(OBS_BASE + k, ACT, k, SACConfig(), lambda n=name, kw=kwargs:
                             build(n, **kw))  # fmt: skip
        agent.diagnostics = diagnostics
        agents[name] = agent
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + repeats):
        batch = buf.sample((BATCH // k) * k)
        for name, agent in agents.items():
            t0 = time.perf_counter()
            metrics = agent.update(batch)
            dt = time.perf_counter() - t0
            if bool(metrics["skipped"]):
                raise RuntimeError(f"{name}: update skipped (non-finite losses)")
            if i >= warmup:
                times[name].append(dt * 1e3)
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        ratio = statistics.median(a / b for a, b in zip(ts, times["mean"], strict=True))
        out[name] = (statistics.median(ts), q[2] - q[0], ratio)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, nargs="+", default=[10, 50], help="K values")
    ap.add_argument("--balancers", nargs="+", default=list(BALANCERS), choices=BALANCERS)
    ap.add_argument("--repeats", type=int, default=15, help="timed updates per cell")
    ap.add_argument("--warmup", type=int, default=3, help="untimed updates first")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--diagnostics", action="store_true",
                    help="also compute gradient statistics (as on logged updates)")
    ap.add_argument("--backends", nargs="+", default=["onednn", "torch"],
                    choices=["onednn", "torch"],
                    help="float32 CPU products: mtrl.onednn (the default in mtrl) and/or "
                    "torch's own (MKL); each backend is its own set of rows and ratios")
    ap.add_argument("--default-allocator", action="store_true",
                    help="leave glibc's malloc as it is (see mtrl.runtime.configure_cpu)")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.threads < 1 or args.warmup < 0:
        ap.error("--repeats and --threads must be >= 1, --warmup >= 0")
    if "mean" not in args.balancers:
        args.balancers = ["mean", *args.balancers]
    cpu_note = configure_cpu(args.threads, keep_freed_memory=not args.default_allocator)

    print("# mtrl SAC update benchmark\n")
    print(f"- torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"Python {platform.python_version()}; {cpu_note}")
    print(f"- batch (1280 // K) × K (1280 at K=10, 1250 at K=50), 3×400 MLPs, all three "
          f"losses balanced, diagnostics={args.diagnostics}, median of {args.repeats} "
          "updates (IQR in brackets); the balancers' updates run in turn in each round "
          "and × mean is the median over rounds of the ratio within a round")
    print(f"- load average at start: {os.getloadavg()[0]:.2f}\n")
    print("| backend | K | balancer | ms / update | × mean | target |")
    print("|---|---|---|---|---|---|")
    for k in args.tasks:
        buf = filled_buffer(k)
        for backend in args.backends:
            if onednn.set_enabled(backend == "onednn") != (backend == "onednn"):
                print(f"| {backend} | {k} | (oneDNN not available in this torch build) |||||")
                continue
            results = time_updates(args.balancers, k, buf, args.repeats, args.warmup,
                                   args.diagnostics)
            for name, (ms, iqr, ratio) in results.items():
                target = TARGETS.get(k) if name != "mean" else None
                if name == "sdmgrad-os" and k >= 50:
                    target = 1.2
                verdict = "" if target is None else (
                    f"≤ {target}× {'met' if ratio <= target else 'MISSED'}")
                print(f"| {backend} | {k} | {name} | {ms:.0f} [{iqr:.0f}] | {ratio:.2f} | "
                      f"{verdict} |", flush=True)
    onednn.set_enabled(True)
    print(f"\n- load average at end: {os.getloadavg()[0]:.2f}; peak resident memory "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB")


if __name__ == "__main__":
    main()
