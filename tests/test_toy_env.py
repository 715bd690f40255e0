"""The toy env (mtrl/envs/toy.py), with the
observation and episode ends worked out by hand."""

from __future__ import annotations

import torch

from mtrl.envs.toy import ToyMultiTaskEnv


def test_observation_is_position_goal_and_task_one_hot():
    """Fixed goals sit at angle 2πk/4 on the circle of radius 0.6: (0.6, 0), (0, 0.6),
    (-0.6, 0), (0, -0.6); row k's one-hot marks task k (the agent reads the task id from
    it)."""
    env = ToyMultiTaskEnv(seed=0)
    obs = env.reset()
    assert obs.shape == (4, 2 + 2 + 4)
    goals = torch.tensor([[0.6, 0.0], [0.0, 0.6], [-0.6, 0.0], [0.0, -0.6]])
    torch.testing.assert_close(obs[:, 2:4], goals, atol=1e-6, rtol=0)
    assert torch.equal(obs[:, 4:], torch.eye(4))
    assert (obs[:, :2].abs() <= 0.1).all()  # start within 0.1 of the origin


def test_success_ends_the_episode_as_termination_even_at_the_time_limit():
    """With terminate_on_success, reaching the goal on the very first step is a
    termination; reaching it on the last allowed step is a termination too and NOT also a
    truncation (one reason per end)."""
    env = ToyMultiTaskEnv(max_episode_steps=3, terminate_on_success=True)
    env.reset()
    env.pos = env.goals.clone()  # at the goal: distance 0 after a zero action
    out = env.step(torch.zeros(4, 2))
    assert out.success.all() and out.terminated.all() and not out.truncated.any()
    env.reset()
    env.pos, env.t = env.goals.clone(), torch.full((4,), 2)  # the next step is the 3rd
    out = env.step(torch.zeros(4, 2))
    assert out.terminated.all() and not out.truncated.any()
    # without terminate_on_success the same step is a plain truncation
    env = ToyMultiTaskEnv(max_episode_steps=3)
    env.reset()
    env.pos, env.t = env.goals.clone(), torch.full((4,), 2)
    out = env.step(torch.zeros(4, 2))
    assert out.success.all() and out.truncated.all() and not out.terminated.any()


def test_one_tasks_episode_end_leaves_the_others_clocks_alone():
    """(Mutation testing:) task 0 terminates at its goal and is reset; tasks 1-3 go on to
    their own time limit (steps 10 and 20), they do not restart with task 0."""
    env = ToyMultiTaskEnv(max_episode_steps=10, terminate_on_success=True)
    env.reset(seed=0)
    env.pos[0] = env.goals[0]  # task 0 ends on the first step, and again after each reset
    truncated_at = []
    for step in range(1, 21):
        if step > 1:
            env.pos[0] = env.goals[0]
        out = env.step(torch.zeros(4, 2))
        assert bool(out.terminated[0])
        if out.truncated[1:].any():
            assert out.truncated[1:].all()
            truncated_at.append(step)
    assert truncated_at == [10, 20]


def test_positions_stay_in_the_unit_square():
    env = ToyMultiTaskEnv(max_episode_steps=100)
    env.reset(seed=0)
    for _ in range(30):
        env.step(torch.ones(4, 2))
    assert torch.equal(env.pos, torch.ones(4, 2))
