"""Shared, session-scoped environment fixtures.

Building MT10 costs ~7-9 s (goal-set generation), so one instance is built per test
session and shared; tests that use it must ``reset()`` it first and must not close it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from mtrl.envs import EnvConfig, MultiTaskVecEnv, make_envs

MT10_CFG = EnvConfig(benchmark="MT10", seed=0, max_episode_steps=500, goal_mode="random")


@pytest.fixture(scope="session")
def mt10_envs() -> Iterator[MultiTaskVecEnv]:
    """MT10, sync, seed 0, random goals, 500-step episodes, CPU. Shared: reset before use."""
    envs = make_envs(MT10_CFG)
    yield envs
    envs.close()


@pytest.fixture
def build_envs() -> Iterator[Callable[..., MultiTaskVecEnv]]:
    """Factory ``build_envs(**EnvConfig kwargs)``; everything it built is closed afterwards."""
    built: list[MultiTaskVecEnv] = []

    def build(**kwargs) -> MultiTaskVecEnv:
        envs = make_envs(EnvConfig(**kwargs))
        built.append(envs)
        return envs

    yield build
    for envs in built:
        envs.close()
