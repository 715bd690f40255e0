"""Networks: every task reaches its own head (not
only head 1, which a reversed mapping of three heads leaves in place), and equal log-std
bounds are refused."""

from __future__ import annotations

import pytest
import torch

from mtrl.agents import SquashedGaussianActor, TwinCritic

K, OBS_DIM, ACT = 3, 8, 2


@pytest.mark.parametrize("j", range(K))
def test_each_task_uses_the_head_with_its_own_index(j):
    """Perturbing head ``j`` changes exactly the rows of task ``j``, for every ``j``: the
    head layout is task-major (head k = task k), which checkpoints rely on."""
    torch.manual_seed(0)
    actor = SquashedGaussianActor(OBS_DIM, ACT, (8,), num_heads=K)
    critic = TwinCritic(OBS_DIM, ACT, (8,), num_heads=K)
    tid = torch.tensor([0, 1, 2, 2, 1, 0])
    obs, act, eps = torch.randn(6, OBS_DIM), torch.rand(6, ACT), torch.randn(6, ACT)
    _, lp0, m0 = actor(obs, tid, eps)
    q0 = critic(obs, act, tid)
    with torch.no_grad():
        actor.head.bias[j * 2 * ACT : (j + 1) * 2 * ACT] += 1.0
        for member in critic.members:
            member[-1].bias[j] += 1.0
    _, lp1, m1 = actor(obs, tid, eps)
    q1 = critic(obs, act, tid)
    changed = tid == j
    assert torch.equal((m1 != m0).any(1), changed)
    assert torch.equal(lp1 != lp0, changed)
    # the critic's bias moves Q by exactly 1 in the rows of task j, nowhere else
    torch.testing.assert_close(q1 - q0, changed.float().expand(2, -1))


def test_equal_log_std_bounds_are_refused():
    """``low == high`` would fix the std (no entropy to tune): an error, like low > high."""
    for bounds in ((0.5, 0.5), (1.0, -1.0)):
        with pytest.raises(ValueError, match="low < high"):
            SquashedGaussianActor(OBS_DIM, ACT, (8,), log_std_bounds=bounds)
    SquashedGaussianActor(OBS_DIM, ACT, (8,), log_std_bounds=(0.5, 0.50001))  # fine


def test_twin_critic_builds_the_number_of_members_asked_for():
    """``num_members`` sets the number of Q networks (rows of the output), not always 2."""
    critic = TwinCritic(OBS_DIM, ACT, (8,), num_members=3)
    assert len(critic.members) == 3
    assert critic(torch.randn(5, OBS_DIM), torch.rand(5, ACT)).shape == (3, 5)
