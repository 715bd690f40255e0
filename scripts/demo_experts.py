"""Evaluate Meta-World's scripted expert policies on MT10 with mtrl's evaluator.

A sanity check of the environment + evaluation pipeline, independent of training: the
experts should solve nearly every MT10 task.

    python scripts/demo_experts.py                       # metaworld-plus style, 10 episodes/task
    python scripts/demo_experts.py --protocol mtrl       # fixed goals, 150-step episodes, 1 episode
"""

from __future__ import annotations

import argparse
import time

import torch

from mtrl.envs import PROTOCOLS, EnvConfig, eval_env_config, evaluate, expert_policy, make_envs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--benchmark", default="MT10", choices=["MT10", "MT50"])
    p.add_argument("--protocol", default="metaworld-plus", choices=sorted(PROTOCOLS))
    p.add_argument("--episodes", type=int, default=10, help="episodes per task (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vector-strategy", default="sync", choices=["sync", "async"])
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    train_cfg = EnvConfig(
        benchmark=args.benchmark, seed=args.seed, vector_strategy=args.vector_strategy
    )
    cfg = eval_env_config(train_cfg, args.protocol)
    t0 = time.perf_counter()
    with make_envs(cfg) as envs:
        built = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = evaluate(expert_policy(envs.task_names), envs, episodes_per_task=args.episodes)
        ran = time.perf_counter() - t0

    print(
        f"\nScripted experts on {args.benchmark} (protocol {args.protocol}: "
        f"{cfg.max_episode_steps}-step episodes, goal_mode {cfg.goal_mode}, "
        f"{args.episodes} episodes/task, seed {args.seed})\n"
    )
    width = max(len(t) for t in result.task_names)
    print(f"| {'task':<{width}} | success | mean return |")
    print(f"|{'-' * (width + 2)}|--------:|------------:|")
    for t in result.task_names:
        print(f"| {t:<{width}} | {result.success_rate[t]:7.2f} | {result.mean_return[t]:11.1f} |")
    print(
        f"| {'**mean**':<{width}} | {result.mean_success:7.2f} | "
        f"{float(result.mean_return_tensor.mean()):11.1f} |"
    )
    print(
        f"\nbuilt in {built:.1f} s; {result.env_steps:,} env-steps in {ran:.1f} s "
        f"({result.env_steps / ran:,.0f} env-steps/s incl. the experts)"
    )


if __name__ == "__main__":
    main()
