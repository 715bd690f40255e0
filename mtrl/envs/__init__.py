"""Meta-World v3 multi-task environments: building, seeding, task ids, evaluation.

    from mtrl.envs import EnvConfig, make_envs, evaluate, eval_env_config
    envs = make_envs(EnvConfig(benchmark="MT10", seed=1))      # K=10, obs_dim 49
    obs = envs.reset()                                          # (K, obs_dim) on cfg.device
    step = envs.step(actions)                                   # Step(obs, next_obs, reward, ...)
    result = evaluate(policy, make_envs(eval_env_config(cfg, "mtrl")), episodes_per_task=1)

This layer knows nothing about networks, balancers or agents.
"""

from mtrl.envs.config import (
    BENCHMARKS,
    GOAL_MODES,
    MAX_PATH_LENGTH,
    RAW_OBS_DIM,
    REWARD_VERSIONS,
    VECTOR_STRATEGIES,
    EnvConfig,
    all_task_names,
    benchmark_task_names,
)
from mtrl.envs.evaluation import (
    PROTOCOLS,
    EvalResult,
    ProtocolSpec,
    eval_env_config,
    eval_seed,
    evaluate,
    get_protocol,
)
from mtrl.envs.experts import expert_policy
from mtrl.envs.vec import HostStep, MultiTaskVecEnv, Step, make_envs

__all__ = [
    "BENCHMARKS",
    "GOAL_MODES",
    "MAX_PATH_LENGTH",
    "PROTOCOLS",
    "RAW_OBS_DIM",
    "REWARD_VERSIONS",
    "VECTOR_STRATEGIES",
    "EnvConfig",
    "EvalResult",
    "HostStep",
    "MultiTaskVecEnv",
    "ProtocolSpec",
    "Step",
    "all_task_names",
    "benchmark_task_names",
    "eval_env_config",
    "eval_seed",
    "evaluate",
    "expert_policy",
    "get_protocol",
    "make_envs",
]
