"""Benchmark the balancer plumbing and the balancers' solves; prints Markdown tables.

(a) Per-task gradients of SAC-sized networks (3×400 MLPs, obs 39+K with the one-hot task
    id, action 4, batch 1280 split task-major into K blocks of ``1280 // K``):
    the actor loss (through a constant twin critic) and the twin-critic loss, the latter
    both as two ``nn.Linear`` MLPs (what ``mtrl.agents.networks.TwinCritic`` does, chosen
    from this comparison) and, for reference, as stacked ``[2, in, out]`` weights
    evaluated with ``baddbmm`` or with one ``addmm`` per member. Compared with ONE plain
    backward of the mean loss:

    * ``mean path``: ``balanced_backward`` with ``mean`` (vmapped forward, one backward);
    * ``task grads``: ``mtrl.grad.task_gradients`` (vmap of grad over the K blocks);
    * ``+ Gramian``: the same plus ``G Gᵀ`` (``mtrl.balancers.gramian``, as balancers do);
    * ``balanced_backward``: end to end with a uniform-weight Gramian balancer
      (``diagnostics=False``: one Gramian, the combine, the ``.grad`` write);
    * ``balanced_backward_terms``: the same from per-row loss terms, what the SAC agent
      calls (with oneDNN: one forward and one backward with per-block weight gradients
      from the layers, no ``torch.func``; otherwise the same ``vmap`` path);
    * ``loop 1f+Kb``: one forward, then K ``autograd.grad`` calls (the original mtrl code);
    * ``loop K(f+b)``: K separate forward + backward calls on the blocks;
    * ``batched bwd``: ``autograd.grad(..., is_grads_batched=True)`` on the loss vector
      (what ``balanced_backward_from_losses`` does).

(b) ``combine`` time of every registered balancer on random ``G`` (K × D, D = 1000).

Networks use mtrl's layers (``mtrl.onednn.MLP`` of ``mtrl.onednn.Linear``), timed
with both float32 CPU backends in one run (``--backends onednn torch``): oneDNN products
(mtrl's default) and torch's own (MKL, as with ``MTRL_ONEDNN=0``). The stacked-weight
critics are reference rows, printed with ``--all-critics``.

Usage: ``python scripts/bench_balancers.py [--threads 1] [--repeats 7] [--quick]``.
Timings are medians of wall-clock time on this machine; they are noisy when other
processes compete for the cores (the load average is printed before and after).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from mtrl import onednn
from mtrl.balancers import Balancer, build, gramian, names
from mtrl.grad import (
    balanced_backward,
    balanced_backward_terms,
    mean_of_terms,
    task_gradients,
    task_losses,
)
from mtrl.onednn import MLP, Linear
from mtrl.runtime import configure_cpu

OBS_BASE, ACT, HIDDEN, BATCH = 39, 4, 400, 1280


# ---------------------------------------------------------------------------- networks
def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """mtrl's MLP (``mtrl.onednn.MLP``: oneDNN or torch products per the backend)."""
    return MLP(
        Linear(in_dim, hidden), nn.ReLU(),
        Linear(hidden, hidden), nn.ReLU(),
        Linear(hidden, hidden), nn.ReLU(),
        Linear(hidden, out_dim),
    )  # fmt: skip


class TwinMLP(nn.Module):
    """Two independent Q MLPs; returns ``(2, N)``."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.q1, self.q2 = mlp(in_dim, hidden, 1), mlp(in_dim, hidden, 1)

    def forward(self, obs: Tensor, act: Tensor) -> Tensor:
        x = torch.cat([obs, act], -1)
        return torch.stack([self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)])


class StackedTwin(nn.Module):
    """Both Q networks as stacked ``[2, in, out]`` weights.

    ``per_member=False``: one ``baddbmm`` per layer.
    ``per_member=True``: one ``addmm`` per member and layer.
    Same parameters and FLOPs, but under ``vmap`` (weights unbatched, input batched)
    ``bmm``'s batching rule expands the weight to ``[K, 2, in, out]`` while ``mm``'s
    folds K into the rows.
    """

    def __init__(self, in_dim: int, hidden: int, per_member: bool = False) -> None:
        super().__init__()
        self.per_member = per_member
        dims = [in_dim, hidden, hidden, hidden, 1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for d_in, d_out in zip(dims[:-1], dims[1:], strict=True):
            bound = 1 / math.sqrt(d_in)
            self.weights.append(nn.Parameter(torch.empty(2, d_in, d_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(2, 1, d_out).uniform_(-bound, bound)))

    def forward(self, obs: Tensor, act: Tensor) -> Tensor:
        h = torch.cat([obs, act], -1)
        n = len(self.weights)
        if self.per_member:
            qs = []
            members = [(w.unbind(0), b.unbind(0)) for w, b in zip(self.weights, self.biases,
                                                                   strict=True)]
            for e in range(2):
                x = h
                for i, (w, b) in enumerate(members):
                    x = torch.addmm(b[e], x, w[e])
                    if i < n - 1:
                        x = F.relu(x)
                qs.append(x.squeeze(-1))
            return torch.stack(qs)
        h = h.unsqueeze(0).expand(2, *h.shape)
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = torch.baddbmm(b, h, w)
            if i < n - 1:
                h = F.relu(h)
        return h.squeeze(-1)


# ---------------------------------------------------------------------------- problems
class Problem:
    """A module, per-row loss terms, a task-major batch and its per-block loss function
    (the mean of the block's terms)."""

    def __init__(self, name: str, module: nn.Module, terms_fn: Callable,
                 batch: tuple[Tensor, ...]):  # fmt: skip
        self.name, self.module, self.terms_fn, self.batch = name, module, terms_fn, batch
        self.loss_fn = mean_of_terms(terms_fn)
        self.params = dict(module.named_parameters())
        self.plist = list(self.params.values())
        self.k = batch[0].shape[0]
        self.dim = sum(p.numel() for p in self.plist)
        self.merged = tuple(t.reshape(-1, *t.shape[2:]) for t in batch)


CRITICS = {
    "critic (2 MLPs, = TwinCritic)": lambda d, h: TwinMLP(d, h),
    "critic (stacked, baddbmm)": lambda d, h: StackedTwin(d, h),
    "critic (stacked, addmm per member)": lambda d, h: StackedTwin(d, h, per_member=True),
}


def critic_problem(k: int, hidden: int, name: str) -> Problem:
    obs_dim, b = OBS_BASE + k, BATCH // k
    critic = CRITICS[name](obs_dim + ACT, hidden)
    obs = torch.randn(k, b, obs_dim)
    act = torch.rand(k, b, ACT) * 2 - 1
    target = torch.randn(k, b)

    def terms_fn(params, obs, act, target):
        q = functional_call(critic, params, (obs, act))  # (2, n)
        return 0.5 * ((q - target) ** 2).sum(0)

    return Problem(name, critic, terms_fn, (obs, act, target))


def actor_problem(k: int, hidden: int) -> Problem:
    obs_dim, b = OBS_BASE + k, BATCH // k
    actor = mlp(obs_dim, hidden, 2 * ACT)
    critic = TwinMLP(obs_dim + ACT, hidden)  # a captured constant
    for p in critic.parameters():
        p.requires_grad_(False)
    obs = torch.randn(k, b, obs_dim)
    eps = torch.randn(k, b, ACT)  # reparameterisation noise, drawn outside the loss
    alpha = torch.rand(k, 1).expand(k, b).contiguous() * 0.1  # per-task temperature

    def terms_fn(params, obs, eps, alpha):
        mean, raw = functional_call(actor, params, (obs,)).chunk(2, -1)
        log_std = -20 + 11 * (torch.tanh(raw) + 1)
        u = mean + log_std.exp() * eps
        log_n = -0.5 * eps.pow(2) - log_std - 0.5 * math.log(2 * math.pi)
        logp = (log_n - 2 * (math.log(2) - u - F.softplus(-2 * u))).sum(-1)
        q = critic(obs, torch.tanh(u)).min(0).values
        return alpha * logp - q

    return Problem("actor", actor, terms_fn, (obs, eps, alpha))


# ---------------------------------------------------------------------------- timing
def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def paired_ms(
    fns: dict[str, Callable[[], object]], repeats: int, base: str
) -> tuple[dict[str, float], dict[str, float]]:
    """Median ms of each function, and the median over rounds of its time / ``base``'s.

    Each round runs every function once, in turn, so that slow drifts of the machine
    (other load, frequency) hit the numerator and the denominator of a ratio alike.
    """
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    ratio = {
        name: statistics.median(a / b for a, b in zip(t, times[base], strict=True))
        for name, t in times.items()
    }
    return ms, ratio


class Uniform(Balancer):
    """A Gramian-based stand-in (weights 1/K from the Gramian's size)."""

    name = "bench-uniform"

    def weights(self, gram, losses):
        return torch.full((gram.shape[0],), 1.0 / gram.shape[0], dtype=torch.float64)


def gradient_methods(pb: Problem) -> dict[str, Callable[[], object]]:
    f, params, batch, plist, k = pb.loss_fn, pb.params, pb.batch, pb.plist, pb.k
    mean_bal, uniform = build("mean"), Uniform()

    def clear():
        for p in plist:
            p.grad = None

    def plain():
        return torch.autograd.grad(f(params, *pb.merged), plist)

    def mean_path():
        clear()
        return balanced_backward(f, params, batch, mean_bal)

    def grads():
        return task_gradients(f, params, batch)

    def grads_gram():
        return gramian(task_gradients(f, params, batch)[1])  # what balancers compute

    def balanced():
        clear()
        return balanced_backward(f, params, batch, uniform, diagnostics=False)

    def balanced_terms():
        clear()
        return balanced_backward_terms(pb.terms_fn, params, pb.merged, k, uniform,
                                       diagnostics=False)  # fmt: skip

    def loop_one_forward():
        losses = task_losses(f, params, batch)
        rows = []
        for i in range(k):
            gs = torch.autograd.grad(losses[i], plist, retain_graph=i < k - 1)
            rows.append(torch.cat([g.reshape(-1) for g in gs]))
        return torch.stack(rows)

    def loop_blocks():
        rows = []
        for i in range(k):
            gs = torch.autograd.grad(f(params, *(t[i] for t in batch)), plist)
            rows.append(torch.cat([g.reshape(-1) for g in gs]))
        return torch.stack(rows)

    def batched_bwd():
        losses = task_losses(f, params, batch)
        eye = torch.eye(k, dtype=losses.dtype)
        gs = torch.autograd.grad(losses, plist, grad_outputs=eye, is_grads_batched=True)
        return torch.cat([g.reshape(k, -1) for g in gs], 1)

    return {
        "plain bwd": plain,
        "mean path": mean_path,
        "task grads": grads,
        "+ Gramian": grads_gram,
        "balanced_backward": balanced,
        "balanced_backward_terms": balanced_terms,
        "loop 1f+Kb": loop_one_forward,
        "loop K(f+b)": loop_blocks,
        "batched bwd": batched_bwd,
    }


SLOW = {"loop 1f+Kb", "loop K(f+b)", "batched bwd"}


def check_equal(pb: Problem) -> float:
    """Max abs difference between the batched per-task gradients and the block loop."""
    g = task_gradients(pb.loss_fn, pb.params, pb.batch)[1]
    rows = []
    for i in range(pb.k):
        gs = torch.autograd.grad(pb.loss_fn(pb.params, *(t[i] for t in pb.batch)), pb.plist)
        rows.append(torch.cat([x.reshape(-1) for x in gs]))
    return float((g - torch.stack(rows)).abs().max() / torch.stack(rows).abs().max())


def bench_gradients(
    ks: list[int], hidden: int, repeats: int, slow_repeats: int, backends: list[str],
    critics: list[str],
) -> None:
    cols = list(gradient_methods(actor_problem(2, 4)))
    print("## (a) Per-task gradients vs one plain backward\n")
    print(f"ms (ratio to plain bwd), median of {repeats} runs ({slow_repeats} for the loops "
          "and batched bwd); the other columns run in turn in each of the rounds and their "
          "ratio is the median over rounds of the ratio within a round. "
          "Batch 1280 // K per task. Backend: float32 CPU products of "
          "mtrl's layers and Gramians, `onednn` (mtrl's default) or `torch` (MKL, "
          "`MTRL_ONEDNN=0`); ratios are within a backend.\n")  # fmt: skip
    print("| backend | network | K | D | " + " | ".join(cols) + " | max rel err |")
    print("|---|---|---|---|" + "---|" * (len(cols) + 1))
    for k, backend in ((k, b) for k in ks for b in backends):
        if onednn.set_enabled(backend == "onednn") != (backend == "onednn"):
            print(f"| {backend} | (oneDNN not available in this torch build) |")
            continue
        torch.manual_seed(0)
        problems = [actor_problem(k, hidden)] + [critic_problem(k, hidden, c) for c in critics]
        for pb in problems:
            err = check_equal(pb)
            methods = gradient_methods(pb)
            fast = {c: fn for c, fn in methods.items() if c not in SLOW}
            ms, ratio = paired_ms(fast, repeats, base="plain bwd")
            for col in SLOW:
                ms[col] = median_ms(methods[col], slow_repeats)
                ratio[col] = ms[col] / ms["plain bwd"]
            cells = [f"{ms[c]:.1f}" if c == "plain bwd" else f"{ms[c]:.1f} ({ratio[c]:.2f}×)"
                     for c in cols]  # fmt: skip
            print(f"| {backend} | {pb.name} | {k} | {pb.dim:,} | " + " | ".join(cells)
                  + f" | {err:.1e} |", flush=True)  # fmt: skip
            del methods, pb
    onednn.set_enabled(True)
    print()


def bench_solvers(ks: list[int], repeats: int, dim: int = 1000) -> None:
    print(f"## (b) `combine` time of every registered balancer (random G, D = {dim})\n")
    print(f"median ms over {repeats} random G; targets ≤ 2 ms at K = 10, ≤ 20 ms at K = 50.\n")
    print("| balancer | " + " | ".join(f"K={k} ms" for k in ks) + " | notes |")
    print("|---|" + "---|" * (len(ks) + 1))
    targets = {10: 2.0, 50: 20.0}
    for name in names():
        cells, notes = [], []
        for k in ks:
            gen = torch.Generator().manual_seed(k)
            try:
                bal = build(name)
            except ValueError as exc:
                cells.append("n/a")
                notes.append(str(exc).splitlines()[0])
                break
            common = torch.randn(dim, generator=gen)
            gs = [torch.randn(k, dim, generator=gen) + 0.5 * common for _ in range(repeats + 1)]
            losses = [torch.rand(k, generator=gen) + 0.1 for _ in range(repeats + 1)]
            it = iter(range(repeats + 1))

            def call(bal=bal, gs=gs, losses=losses, it=it):
                i = next(it)
                return bal.combine(gs[i], losses[i])

            try:
                t = median_ms(call, repeats, warmup=1)
            except Exception as exc:  # report, keep benchmarking the others
                cells.append("error")
                notes.append(f"K={k}: {type(exc).__name__}: {exc}"[:80])
                continue
            mark = "" if t <= targets.get(k, math.inf) else " ✗"
            cells.append(f"{t:.2f}{mark}")
            fb = bal.info.get("fallback")
            if fb:
                notes.append(f"K={k} fallback: {fb}"[:80])
        print(f"| {name} | " + " | ".join(cells) + f" | {'; '.join(notes)} |", flush=True)
    print()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--repeats", type=int, default=11, help="timed runs per cell (median)")
    ap.add_argument("--quick", action="store_true", help="K=10 only, fewer repeats")
    ap.add_argument("--tasks", type=int, nargs="+", default=None, help="K values (10 50)")
    ap.add_argument("--hidden", type=int, default=HIDDEN, help="MLP width (default 400)")
    ap.add_argument("--skip-gradients", action="store_true", help="only the solver table")
    ap.add_argument("--skip-solvers", action="store_true", help="only the gradient table")
    ap.add_argument("--backends", nargs="+", default=["onednn", "torch"],
                    choices=["onednn", "torch"], help="float32 CPU products to time")
    ap.add_argument("--all-critics", action="store_true",
                    help="also the stacked-weight twin critics (reference rows)")
    ap.add_argument(
        "--default-allocator",
        action="store_true",
        help="leave glibc's malloc as it is (every large block a fresh mmap, page faults on "
        "every (K, D) allocation) instead of mtrl.runtime.configure_cpu's setting",
    )
    args = ap.parse_args(argv)
    if args.threads < 1 or args.repeats < 1:
        ap.error("--threads and --repeats must be >= 1")
    cpu_note = configure_cpu(args.threads, keep_freed_memory=not args.default_allocator)
    ks = args.tasks or ([10] if args.quick else [10, 50])
    repeats = min(args.repeats, 3) if args.quick else args.repeats
    slow_repeats = 1 if args.quick else min(repeats, 3)

    print("# mtrl balancer benchmark\n")
    print(f"- torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"Python {platform.python_version()}; {cpu_note}")  # fmt: skip
    load = os.getloadavg()[0]
    print(f"- load average at start: {load:.2f} (other processes make timings noisy)\n")
    if not args.skip_gradients:
        critics = list(CRITICS) if args.all_critics else list(CRITICS)[:1]
        bench_gradients(ks, args.hidden, repeats, slow_repeats, args.backends, critics)
    if not args.skip_solvers:
        bench_solvers(ks, max(repeats, 5))
    print(f"- load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
