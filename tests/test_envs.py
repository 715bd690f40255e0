"""Tests for mtrl.envs: construction, autoreset/final-obs handling, seeding, evaluation."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
from pathlib import Path

import metaworld
import numpy as np
import pytest
import torch

from mtrl.envs import (
    PROTOCOLS,
    EnvConfig,
    ProtocolSpec,
    Step,
    eval_env_config,
    evaluate,
    expert_policy,
    get_protocol,
    make_envs,
)
from mtrl.envs.vec import _metaworld_num_goals

SMALL_TASKS = ("reach-v3", "push-v3", "drawer-close-v3")


def rollout(envs, steps: int, action_seed: int) -> list[np.ndarray]:
    """Step with seeded random actions; returns every transition field, stacked per step."""
    g = torch.Generator().manual_seed(action_seed)
    out = [envs.reset().numpy().copy()]
    for _ in range(steps):
        a = torch.rand(envs.num_tasks, envs.act_dim, generator=g) * 2 - 1
        s = envs.step(a)
        out.append(
            np.concatenate(
                [
                    s.obs.numpy().ravel(),
                    s.next_obs.numpy().ravel(),
                    s.reward.numpy(),
                    s.terminated.numpy(),
                    s.truncated.numpy(),
                    s.success.numpy(),
                ]
            )
        )
    return out


# --------------------------------------------------------------------------- construction
@pytest.mark.metaworld
def test_mt10_shapes_dtypes_and_task_ids(mt10_envs):
    envs = mt10_envs
    assert envs.task_names == [
        "reach-v3",
        "push-v3",
        "pick-place-v3",
        "door-open-v3",
        "drawer-open-v3",
        "drawer-close-v3",
        "button-press-topdown-v3",
        "peg-insert-side-v3",
        "window-open-v3",
        "window-close-v3",
    ]
    assert (envs.num_tasks, envs.obs_dim, envs.act_dim) == (10, 49, 4)
    assert envs.device == torch.device("cpu")
    assert torch.equal(envs.action_low, -torch.ones(4)) and torch.equal(
        envs.action_high, torch.ones(4)
    )
    obs = envs.reset()
    assert obs.shape == (10, 49) and obs.dtype == torch.float32 and obs.device.type == "cpu"
    assert torch.equal(obs[:, 39:], torch.eye(10))  # task one-hot, in task order
    s = envs.step(torch.zeros(10, 4))
    assert isinstance(s, Step)
    assert s.obs.shape == s.next_obs.shape == (10, 49)
    assert s.obs.dtype == s.next_obs.dtype == s.reward.dtype == torch.float32
    assert s.reward.shape == s.terminated.shape == s.truncated.shape == s.success.shape == (10,)
    assert s.terminated.dtype == s.truncated.dtype == s.success.dtype == torch.bool
    assert not s.terminated.any() and not s.truncated.any()
    # the float fields come out of ONE packed buffer (one host->device transfer per step)
    ptrs = {t.untyped_storage().data_ptr() for t in (s.obs, s.next_obs, s.reward)}
    assert len(ptrs) == 1
    assert s.obs.is_contiguous() and s.next_obs.is_contiguous() and s.reward.is_contiguous()
    assert envs.last_host is not None and np.array_equal(envs.last_host.reward, s.reward.numpy())


@pytest.mark.metaworld
def test_mt1_and_custom_task_names(build_envs):
    mt1 = build_envs(benchmark="MT1", task="reach", goal_mode="fixed", max_episode_steps=5)
    assert mt1.task_names == ["reach-v3"] and mt1.obs_dim == 40
    assert torch.equal(mt1.reset()[:, 39:], torch.ones(1, 1))
    custom = build_envs(
        benchmark="custom",
        tasks=["window-close", "reach-v3"],
        goal_mode="fixed",
        max_episode_steps=5,
    )
    assert custom.config.tasks == ("window-close-v3", "reach-v3")
    assert custom.task_names == ["window-close-v3", "reach-v3"] and custom.obs_dim == 41
    assert [type(e.unwrapped).__name__ for e in custom.venv.envs] == [
        "SawyerWindowCloseEnvV3",
        "SawyerReachEnvV3",
    ]


def test_build_restores_metaworld_goal_count(build_envs, monkeypatch):
    """A fixed-goal build sets Meta-World's module-wide goal count to 1 while it builds,
    then puts back what was there (a sentinel: an earlier test's leftover 1 would make
    "restored" and "left at 1" look the same)."""
    monkeypatch.setattr(metaworld, "_N_GOALS", 37)
    build_envs(benchmark="MT1", task="reach-v3", goal_mode="fixed", max_episode_steps=5)
    assert metaworld._N_GOALS == 37


@pytest.mark.slow
@pytest.mark.metaworld
def test_mt50_construction(build_envs):
    envs = build_envs(benchmark="MT50", goal_mode="fixed", max_episode_steps=10)
    assert (envs.num_tasks, envs.obs_dim, envs.act_dim) == (50, 89, 4)
    assert len(set(envs.task_names)) == 50
    obs = envs.reset()
    assert torch.equal(obs[:, 39:], torch.eye(50))
    s = envs.step(torch.zeros(50, 4))
    assert s.reward.shape == (50,) and torch.isfinite(s.reward).all()


# --------------------------------------------------------------------------- autoreset
@pytest.mark.metaworld
@pytest.mark.filterwarnings("ignore:.*precision lowered:UserWarning")
def test_final_obs_is_true_last_observation_and_matches_single_env(build_envs):
    """max_episode_steps=5: the truncation step's next_obs is the real final obs."""
    horizon, seed = 5, 3
    envs = build_envs(
        benchmark="custom", tasks=SMALL_TASKS[:2], seed=seed, max_episode_steps=horizon
    )
    k = envs.num_tasks
    with _metaworld_num_goals(50):  # what goal_mode="random" builds with
        singles = [
            metaworld.make_mt_envs(
                name,
                seed=seed + i,
                num_tasks=k,
                env_id=i,
                use_one_hot=True,
                max_episode_steps=horizon,
            )
            for i, name in enumerate(envs.task_names)
        ]
    try:
        g = torch.Generator().manual_seed(0)
        obs = envs.reset()
        ref_obs = np.stack([e.reset()[0] for e in singles]).astype(np.float32)
        np.testing.assert_array_equal(obs.numpy(), ref_obs)
        for t in range(3 * horizon + 2):
            a = torch.rand(k, 4, generator=g) * 2 - 1
            s = envs.step(a)
            ref = [e.step(a[i].numpy()) for i, e in enumerate(singles)]
            ref_next = np.stack([r[0] for r in ref]).astype(np.float32)
            ref_rew = np.array([r[1] for r in ref], dtype=np.float32)
            ref_trunc = np.array([r[3] for r in ref])
            # next_obs: the true observation reached, also at the truncation step
            np.testing.assert_array_equal(s.next_obs.numpy(), ref_next)
            np.testing.assert_array_equal(s.reward.numpy(), ref_rew)
            np.testing.assert_array_equal(s.truncated.numpy(), ref_trunc)
            assert not s.terminated.any()  # time limit is truncation, not termination
            ended = (t + 1) % horizon == 0
            assert bool(s.truncated.all()) == ended and bool(s.truncated.any()) == ended
            if ended:
                ref_reset = np.stack([e.reset()[0] for e in singles]).astype(np.float32)
                np.testing.assert_array_equal(s.obs.numpy(), ref_reset)
                assert (s.obs - s.next_obs).abs().max() > 1e-3  # new episode != final obs
                # a fresh episode restarts from the hand's reset pose: not a continuation
                assert not torch.allclose(s.obs[:, :3], s.next_obs[:, :3])
            else:
                assert torch.equal(s.obs, s.next_obs)
            # continuity: what we act on next is what the reference env will step from
            obs = s.obs
    finally:
        for e in singles:
            e.close()


@pytest.mark.metaworld
def test_success_reported_on_the_final_step_comes_from_final_info(build_envs):
    """With terminate_on_success the success step is also the autoreset step."""
    envs = build_envs(
        benchmark="MT1",
        task="reach-v3",
        goal_mode="fixed",
        terminate_on_success=True,
        max_episode_steps=200,
    )
    policy = expert_policy(envs.task_names)
    obs = envs.reset()
    for _ in range(200):
        s = envs.step(policy(obs))
        obs = s.obs
        if s.terminated.any():
            break
    assert bool(s.terminated[0]) and bool(s.success[0]) and not bool(s.truncated[0])
    assert not torch.equal(s.obs, s.next_obs)


# --------------------------------------------------------------------------- seeding
@pytest.mark.metaworld
def test_same_seed_identical_1000_steps_different_seed_differs(build_envs):
    cfg = dict(benchmark="custom", tasks=SMALL_TASKS, max_episode_steps=200)  # 5 goal draws
    a = rollout(build_envs(seed=7, **cfg), 1000, action_seed=1)
    b = rollout(build_envs(seed=7, **cfg), 1000, action_seed=1)
    assert len(a) == len(b) == 1001
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    c = rollout(build_envs(seed=8, **cfg), 5, action_seed=1)
    assert not np.array_equal(a[0], c[0])  # different goal sets from the very first obs


@pytest.mark.metaworld
def test_mt10_seeding(mt10_envs, build_envs):
    cfg = dict(benchmark="MT10", goal_mode="fixed", max_episode_steps=20)
    a = rollout(build_envs(seed=0, **cfg), 60, action_seed=2)
    b = rollout(build_envs(seed=0, **cfg), 60, action_seed=2)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    # the shared random-goal MT10 (seed 0) starts from other goals than seed 1 fixed goals
    c = rollout(build_envs(seed=1, **cfg), 1, action_seed=2)
    assert not np.array_equal(a[0], c[0])
    # reset(seed) re-seeds: repeatable episodes from the same env object
    r1 = rollout_after_reset(mt10_envs, seed=123)
    r2 = rollout_after_reset(mt10_envs, seed=123)
    np.testing.assert_array_equal(r1, r2)


def rollout_after_reset(envs, seed: int) -> np.ndarray:
    obs = [envs.reset(seed=seed).numpy().copy()]
    for _ in range(5):
        obs.append(envs.step(torch.full((envs.num_tasks, 4), 0.3)).next_obs.numpy().copy())
    return np.stack(obs)


@pytest.mark.metaworld
def test_goal_modes(build_envs):
    goal = slice(36, 39)
    fixed = build_envs(
        benchmark="custom", tasks=SMALL_TASKS[:2], goal_mode="fixed", max_episode_steps=2
    )
    rand = build_envs(
        benchmark="custom", tasks=SMALL_TASKS[:2], goal_mode="random", max_episode_steps=2
    )
    for envs, want_same in ((fixed, True), (rand, False)):
        goals = [envs.reset()[:, goal].clone()]
        for _ in range(6):  # 3 episodes
            s = envs.step(torch.zeros(envs.num_tasks, 4))
            if s.truncated.all():
                goals.append(s.obs[:, goal].clone())
        assert len(goals) == 4
        same = all(torch.equal(goals[0], g) for g in goals[1:])
        assert same == want_same


@pytest.mark.metaworld
def test_async_matches_sync(build_envs):
    cfg = dict(
        benchmark="custom", tasks=SMALL_TASKS[:2], seed=4, goal_mode="random", max_episode_steps=4
    )
    sync = build_envs(vector_strategy="sync", **cfg)
    asyn = build_envs(vector_strategy="async", **cfg)
    assert type(asyn.venv).__name__ == "AsyncVectorEnv"
    for x, y in zip(rollout(sync, 10, 5), rollout(asyn, 10, 5), strict=True):
        np.testing.assert_array_equal(x, y)
    # reset(seed) re-seeds the workers' envs too
    np.testing.assert_array_equal(
        rollout_after_reset(sync, seed=11), rollout_after_reset(asyn, seed=11)
    )


def _blocked_signals(pid: int) -> set[int]:
    """Signals blocked by process ``pid`` (Linux: SigBlk in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            mask = int(line.split()[1], 16)
            return {n for n in range(1, 65) if mask >> (n - 1) & 1}
    raise AssertionError("no SigBlk line")


@pytest.mark.metaworld
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_async_workers_survive_ctrl_c_and_hangups(build_envs):
    """Ctrl-C goes to the whole foreground process group: async workers died of it, and the
    trainer's next step failed before its interrupt checkpoint. Workers start with SIGINT
    and SIGHUP blocked; SIGTERM still stops them (AsyncVectorEnv.close(terminate=True))."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    envs = build_envs(benchmark="custom", tasks=SMALL_TASKS[:2], vector_strategy="async",
                      max_episode_steps=4)
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before  # this thread: restored
    pids = [p.pid for p in envs.venv.processes]
    for pid in pids:
        blocked = _blocked_signals(pid)
        assert {signal.SIGINT, signal.SIGHUP} <= blocked and signal.SIGTERM not in blocked
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGHUP)
    envs.reset(seed=0)
    out = envs.step(torch.zeros(envs.num_tasks, envs.act_dim))  # the workers still answer
    assert torch.isfinite(out.reward).all()
    assert all(p.is_alive() for p in envs.venv.processes)


# --------------------------------------------------------------------------- evaluation
@pytest.mark.metaworld
def test_expert_policy_mt10_success(mt10_envs):
    result = evaluate(expert_policy(mt10_envs.task_names), mt10_envs, 2, seed=0)
    assert result.task_names == mt10_envs.task_names
    assert result.episode_success.shape == result.episode_return.shape == (10, 2)
    assert (
        result.success_rate_tensor.shape == (10,)
        and result.success_rate_tensor.dtype == torch.float32
    )
    assert result.mean_success == pytest.approx(float(result.success_rate_tensor.mean()))
    assert set(result.success_rate) == set(mt10_envs.task_names)
    assert result.env_steps == 10 * 2 * 500
    assert result.mean_success >= 0.8, result.success_rate
    assert all(r > 0 for r in result.mean_return.values())


@pytest.mark.metaworld
def test_evaluate_counts_episodes_and_returns(build_envs):
    envs = build_envs(
        benchmark="custom", tasks=SMALL_TASKS[:2], goal_mode="fixed", max_episode_steps=4
    )
    seen: list[torch.Tensor] = []

    def policy(obs):
        assert not torch.is_grad_enabled()
        seen.append(obs)
        return torch.zeros(obs.shape[0], 4)

    r = evaluate(policy, envs, episodes_per_task=3)
    assert len(seen) == 12 and r.env_steps == 24
    # zero actions + fixed goal: every episode is the same, so returns are equal per task
    assert np.allclose(r.episode_return, r.episode_return[:, :1])
    assert r.mean_return["reach-v3"] == pytest.approx(r.episode_return[0].mean())
    assert r.success_rate == {"reach-v3": 0.0, "push-v3": 0.0} and r.mean_success == 0.0


@pytest.mark.metaworld
def test_evaluate_any_step_success_and_uneven_episodes(build_envs):
    """reach ends early on success (many episodes), push-v3 never: extra episodes ignored."""
    envs = build_envs(
        benchmark="custom",
        tasks=("reach-v3", "push-v3"),
        goal_mode="fixed",
        terminate_on_success=True,
        max_episode_steps=60,
    )
    experts = expert_policy(envs.task_names)

    def policy(obs):
        a = experts(obs)
        a[1] = 0.0  # push-v3 does nothing, so never succeeds
        return a

    r = evaluate(policy, envs, episodes_per_task=2)
    assert r.success_rate == {"reach-v3": 1.0, "push-v3": 0.0}
    assert r.env_steps == 2 * 60 * 2  # push needs 2 full episodes; reach's extras ignored


def test_protocols_and_eval_env_config():
    assert PROTOCOLS["mtrl"] == ProtocolSpec(
        max_episode_steps=150, goal_mode="fixed", episodes_per_task=1
    )
    assert PROTOCOLS["metaworld-plus"] == ProtocolSpec(
        max_episode_steps=500, goal_mode="random", episodes_per_task=50
    )
    train = EnvConfig(
        benchmark="MT10",
        seed=5,
        max_episode_steps=150,
        goal_mode="fixed",
        terminate_on_success=True,
    )
    ev = eval_env_config(train, "metaworld-plus")
    assert (ev.max_episode_steps, ev.goal_mode, ev.seed, ev.benchmark) == (500, "random", 5, "MT10")
    assert ev.terminate_on_success is False
    ev = eval_env_config(train, PROTOCOLS["mtrl"])
    assert (ev.max_episode_steps, ev.goal_mode) == (150, "fixed")
    with pytest.raises(ValueError, match="valid choices: mtrl, metaworld-plus"):
        get_protocol("mw+")


@pytest.mark.metaworld
def test_fixed_goal_eval_env_uses_training_goals(build_envs):
    train = EnvConfig(
        benchmark="custom", tasks=SMALL_TASKS[:2], seed=9, goal_mode="fixed", max_episode_steps=500
    )
    a = build_envs(**dataclasses.asdict(train)).reset()
    b = build_envs(**dataclasses.asdict(eval_env_config(train, "mtrl"))).reset()
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(benchmark="MT20"),
            r"unknown benchmark 'MT20'; valid choices: MT10, MT50, MT1, custom, toy$",
        ),
        (dict(benchmark="MT1"), r"benchmark 'MT1' needs `task`"),
        (
            dict(benchmark="MT1", task="reach-v2"),
            r"unknown Meta-World task 'reach-v2'; valid task names: .*reach-v3",
        ),
        (
            dict(benchmark="custom"),
            r"benchmark 'custom' needs `tasks`.*valid task names: .*window-close-v3",
        ),
        (
            dict(benchmark="custom", tasks=("reach-v3", "jump")),
            r"unknown Meta-World task 'jump'; valid task names: assembly-v3, ",
        ),
        (dict(benchmark="custom", tasks=("reach", "reach-v3")), r"more than once: reach-v3"),
        (dict(benchmark="MT10", task="reach-v3"), r"fixed task list"),
        (dict(max_episode_steps=0), r"max_episode_steps must be an integer in 1\.\.500"),
        (dict(max_episode_steps=501), r"max_episode_steps must be an integer in 1\.\.500"),
        (
            dict(vector_strategy="threads"),
            r"unknown vector_strategy 'threads'; valid choices: sync, async$",
        ),
        (
            dict(goal_mode="per-episode"),
            r"unknown goal_mode 'per-episode'; valid choices: random, fixed$",
        ),
        (
            dict(reward_function_version="v3"),
            r"unknown reward_function_version 'v3'; valid choices: v1, v2$",
        ),
        (dict(seed=-1), r"seed must be an integer"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EnvConfig(**kwargs)


def test_config_normalises_names():
    cfg = EnvConfig(benchmark="mt1", task="Reach", vector_strategy="SYNC")
    assert (cfg.benchmark, cfg.task, cfg.vector_strategy) == ("MT1", "reach-v3", "sync")
    assert EnvConfig(benchmark="custom", tasks=["push"]).tasks == ("push-v3",)
    assert len(EnvConfig(benchmark="MT50").task_names) == 50


def test_async_without_fork_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    with pytest.raises(
        ValueError, match=r"'async' needs the 'fork'.*available: spawn.*valid choices here: sync"
    ):
        EnvConfig(vector_strategy="async")
    EnvConfig(vector_strategy="sync")  # still fine


def test_bad_device_is_a_clear_error():
    with pytest.raises(ValueError, match="invalid device 'gpu0'"):
        make_envs(EnvConfig(benchmark="MT1", task="reach-v3", device="gpu0"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            make_envs(EnvConfig(benchmark="MT1", task="reach-v3", device="cuda"))


@pytest.mark.metaworld
def test_step_input_errors(build_envs):
    envs = build_envs(benchmark="MT1", task="reach-v3", goal_mode="fixed", max_episode_steps=5)
    with pytest.raises(RuntimeError, match=r"reset\(\) before"):
        envs.step(torch.zeros(1, 4))
    envs.reset()
    with pytest.raises(ValueError, match=r"shape \(1, 4\), got \(2, 4\)"):
        envs.step(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="non-finite actions for task\\(s\\): reach-v3"):
        envs.step(torch.full((1, 4), float("nan")))
    s = envs.step(torch.full((1, 4), 5.0))  # clipped to the action bounds, not an error
    assert s.reward.shape == (1,)
    envs.close()
    with pytest.raises(RuntimeError, match="closed"):
        envs.reset()
    with pytest.raises(ValueError, match=r"episodes_per_task must be an integer >= 1"):
        evaluate(lambda o: o, envs, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.metaworld
def test_cuda_outputs(build_envs):
    envs = build_envs(benchmark="custom", tasks=SMALL_TASKS[:2], max_episode_steps=3, device="cuda")
    cpu = build_envs(benchmark="custom", tasks=SMALL_TASKS[:2], max_episode_steps=3)
    assert envs.action_low.device.type == "cuda"
    obs, ref = envs.reset(), cpu.reset()
    assert obs.device.type == "cuda" and torch.equal(obs.cpu(), ref)
    kept = []
    for t in range(7):
        a = torch.full((2, 4), 0.1 * (t % 3))
        s, r = envs.step(a.cuda()), cpu.step(a)
        kept.append((s, r))
    for s, r in kept:  # earlier results are not overwritten by the reused pinned buffer
        for x, y in zip(s, r, strict=True):
            assert x.device.type == "cuda" and torch.equal(x.cpu(), y)


def test_toy_benchmark_goes_through_make_envs_and_evaluate():
    cfg = EnvConfig(benchmark="toy", max_episode_steps=5, seed=1)
    envs = make_envs(cfg)
    assert envs.task_names == cfg.task_names and envs.num_tasks == len(cfg.task_names)
    obs = envs.reset()
    assert obs.shape == (envs.num_tasks, envs.obs_dim)
    r = evaluate(lambda o: torch.zeros(o.shape[0], envs.act_dim), envs, episodes_per_task=2)
    assert r.env_steps == 2 * 5 * envs.num_tasks and r.episode_return.shape == (envs.num_tasks, 2)
    assert np.all(r.episode_return < 0)  # reward is minus the distance to the goal


def test_toy_env_honours_terminate_on_success_and_random_goals():
    def drive(cfg, steps=120):
        env = make_envs(cfg)
        obs = env.reset()
        goals, ends = {tuple(obs[0, 2:4].tolist())}, []
        for _ in range(steps):
            out = env.step(((obs[:, 2:4] - obs[:, :2]) * 10).clamp(-1, 1))  # straight to goal
            assert not bool((out.terminated & out.truncated).any())
            ends.append((int(out.terminated.sum()), int(out.truncated.sum())))
            goals.add(tuple(out.obs[0, 2:4].tolist()))
            obs = out.obs
        return goals, ends

    goals, ends = drive(EnvConfig(benchmark="toy", goal_mode="random", max_episode_steps=30,
                                  terminate_on_success=True, seed=1))
    assert sum(t for t, _ in ends) > 4 and len(goals) > 2  # successes end episodes; new goals
    goals, ends = drive(EnvConfig(benchmark="toy", goal_mode="fixed", max_episode_steps=30))
    assert sum(t for t, _ in ends) == 0 and sum(t for _, t in ends) == 4 * 4 and len(goals) == 1


def test_toy_checkpoints_without_goals_keep_the_fixed_goals():
    """Toy checkpoints written before goals were saved come from fixed-goal runs."""
    from mtrl.envs.toy import ToyMultiTaskEnv

    fixed = ToyMultiTaskEnv(goal_mode="fixed").goals.clone()
    env = ToyMultiTaskEnv(goal_mode="random", seed=1)
    env.reset()
    state = env.state_dict()
    del state["goals"]
    other = ToyMultiTaskEnv(goal_mode="random", seed=2, terminate_on_success=True)
    other.reset()
    assert not torch.equal(other.goals, fixed)
    del state["goal_mode"], state["terminate_on_success"]  # as before goal modes
    with pytest.warns(UserWarning, match="trained with goal_mode='fixed'.*the run keeps them"):
        other.load_state_dict(state)
    assert torch.equal(other.goals, fixed)
    other.reset()  # and they stay fixed: that run's semantics, whatever its config says
    assert torch.equal(other.goals, fixed) and not other.terminate_on_success
    # ... on every later resume too: the semantics travel with the state
    third = ToyMultiTaskEnv(goal_mode="random", seed=3, terminate_on_success=True)
    with pytest.warns(UserWarning, match="the run keeps them"):
        third.load_state_dict(other.state_dict())
    third.reset()
    assert torch.equal(third.goals, fixed) and not third.terminate_on_success
