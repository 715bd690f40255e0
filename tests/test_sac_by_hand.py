"""SAC update checks with numbers derived by hand: the TD target, the actor and temperature
losses, and the Polyak update of the target critic (fast, CPU, small or fixed networks)."""

from __future__ import annotations

import math

import torch
from test_agent import ACT, K, make_agent, make_obs, params_of
from torch import Tensor, nn

from mtrl.agents import SACConfig
from mtrl.buffers import Batch

# Six samples, two per task (task-major): task_id = [0, 0, 1, 1, 2, 2].
TASK_ID = torch.tensor([0, 0, 1, 1, 2, 2])
ALPHA = torch.tensor([0.5, 1.0, 2.0])  # per-task temperatures, all different
REWARD = torch.tensor([1.0, -1.0, 0.5, 2.0, 0.0, 3.0])
DONE = torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0, 0.0])  # rows 1 and 4 are terminal
Q1 = torch.tensor([2.0, 4.0, -1.0, 3.0, 5.0, 0.0])
Q2 = torch.tensor([3.0, 1.0, 1.0, 2.0, 6.0, -2.0])  # min(Q1, Q2) = [2, 1, -1, 2, 5, -2]
LOG_PROB = torch.tensor([-1.0, 1.0, 0.5, -2.0, 1.0, 4.0])


class FixedTwin(nn.Module):
    """A twin critic whose rows are fixed numbers ``(2, 6)``, whatever the input."""

    def __init__(self, q1: Tensor, q2: Tensor) -> None:
        super().__init__()
        self.register_buffer("q", torch.stack([q1, q2]))
        self.seen: list[Tensor] = []

    def forward(self, obs: Tensor, action: Tensor, task_id: Tensor | None = None) -> Tensor:
        self.seen.append(obs)
        return self.q.clone()


class FixedActor(nn.Module):
    """A policy whose log-probabilities are fixed numbers, whatever the input."""

    def __init__(self, log_prob: Tensor) -> None:
        super().__init__()
        self.register_buffer("log_prob", log_prob)
        self.seen: list[Tensor] = []

    def forward(self, obs: Tensor, task_id: Tensor | None = None, eps: Tensor | None = None):
        self.seen.append(obs)
        zeros = torch.zeros(obs.shape[0], ACT)
        return zeros, self.log_prob.clone(), zeros


def _fixed_batch() -> Batch:
    gen = torch.Generator().manual_seed(0)
    return Batch(obs=make_obs(TASK_ID, gen), action=torch.zeros(6, ACT), reward=REWARD.clone(),
                 next_obs=make_obs(TASK_ID, gen), done=DONE.clone(), task_id=TASK_ID.clone())


class _Captured(Exception):
    pass


def test_td_target_by_hand_with_done_rows_gamma_and_per_task_temperature():
    """y = r + γ (1 - done) (min_j Q̄_j(s', a') - α_t log π(a'|s')), with a fixed target
    critic and policy so that y follows from the numbers above by hand (γ = 0.5):

        min Q̄       = [2, 1, -1, 2, 5, -2]
        α_t log π'  = [0.5·-1, 0.5·1, 1·0.5, 1·-2, 2·1, 2·4] = [-0.5, 0.5, 0.5, -2, 2, 8]
        soft value  = [2.5, 0.5, -1.5, 4, 3, -10]
        y           = [1 + 1.25, -1 (done), 0.5 - 0.75, 2 + 2, 0 (done), 3 - 5]

    Catches: + instead of - α log π, a target that bootstraps through terminations, a
    hard-coded γ, the online instead of the target critic, max instead of min of the twin,
    and one (mean) temperature instead of each task's own.
    """
    agent = make_agent(SACConfig(hidden_sizes=(16,), gamma=0.5, balance=()))
    agent.critic_target = FixedTwin(Q1, Q2)  # the online critic is a real (different) net
    agent.actor = FixedActor(LOG_PROB)
    with torch.no_grad():
        agent.log_alpha.copy_(ALPHA.log())
    seen: dict[str, Tensor] = {}

    def capture(params, obs, action, task_id, target):
        seen["y"] = target.clone()
        raise _Captured  # the rest of the update is not needed (and the nets are fakes)

    agent._critic_terms = capture
    b = _fixed_batch()
    try:
        agent.update(b)
    except _Captured:
        pass
    expected = torch.tensor([2.25, -1.0, -0.25, 4.0, 0.0, -2.0])
    torch.testing.assert_close(seen["y"], expected, rtol=0, atol=1e-6)
    # the policy and the target critic were asked about the NEXT observations
    assert torch.equal(agent.actor.seen[0], b.next_obs)
    assert torch.equal(agent.critic_target.seen[0], b.next_obs)


def test_actor_terms_use_the_smaller_of_the_two_q_values():
    """Actor term per sample: α_t log π(ã|s) - min(Q1, Q2)(s, ã). With fixed numbers:
    α_t log π = [-0.5, 0.5, 0.5, -2, 2, 8], min Q = [2, 1, -1, 2, 5, -2], so the terms are
    [-2.5, -0.5, 1.5, -4, -3, 10] (the mean of the two Qs, [2.5, 2.5, 0, 2.5, 5.5, -1],
    would give other numbers: SAC's clipped double-Q uses the minimum)."""
    agent = make_agent(SACConfig(hidden_sizes=(16,), balance=()))
    agent.critic = FixedTwin(Q1, Q2)
    agent.actor = FixedActor(LOG_PROB)
    b = _fixed_batch()
    alpha = ALPHA[TASK_ID]
    terms = agent._actor_terms({}, b.obs, b.task_id, torch.zeros(6, ACT), alpha,
                               critic_params={})
    expected = torch.tensor([-2.5, -0.5, 1.5, -4.0, -3.0, 10.0])
    torch.testing.assert_close(terms, expected, rtol=0, atol=1e-6)


def test_temperature_loss_uses_the_actor_samples_and_target_entropy_minus_act_dim():
    """The temperature loss of task t is mean -log α_t (log π(ã|s) + H̄) over its samples,
    with H̄ = -|A| (here -2) and log π that of the actor-loss noise ε (the SECOND normal
    draw of the update; the first, ε', is for the next actions).

    The actor's head is zeroed: μ = 0 and log σ = (-20 + 2) / 2 = -9 for every state, so
    u = e⁻⁹ ε and log π(tanh u) = Σ_j (-ε_j²/2 + 9 - log(2π)/2) up to the tanh correction
    (about u² ≈ 1e-8): a number by hand from ε alone.
    """
    agent = make_agent(SACConfig(hidden_sizes=(16,), balance=()))
    assert agent.target_entropy == -ACT
    with torch.no_grad():
        agent.actor.head.weight.zero_()
        agent.actor.head.bias.zero_()
        agent.log_alpha.copy_(ALPHA.log())
    b = _fixed_batch()
    torch.manual_seed(21)
    torch.randn(6, ACT)  # ε' (next actions)
    eps = torch.randn(6, ACT)  # ε (actor loss and temperature loss)
    log_prob = (-0.5 * eps.pow(2)).sum(1) + ACT * (9.0 - 0.5 * math.log(2 * math.pi))
    torch.manual_seed(21)
    m = agent.update(b)
    assert m["skipped"] == 0
    per_task = lambda x: x.view(K, 2).mean(1)  # noqa: E731
    torch.testing.assert_close(m["actor/entropy"], per_task(-log_prob), rtol=0, atol=1e-4)
    expected = per_task(-ALPHA.log()[TASK_ID] * (log_prob - ACT))
    torch.testing.assert_close(m["alpha/losses"], expected, rtol=0, atol=1e-4)


def test_target_critic_moves_exactly_tau_of_the_way_to_the_online_critic():
    """θ̄ ← θ̄ + τ (θ - θ̄) after the critic step. The target starts 1 away from the online
    critic in every weight and τ = 0.25, so each target weight moves by about -0.25 (not by
    ~τ times a tiny critic step, which a check with τ = 0.005 and equal nets cannot tell
    from not moving at all)."""
    agent = make_agent(SACConfig(hidden_sizes=(16,), tau=0.25, balance=()))
    with torch.no_grad():
        for t, o in zip(agent.critic_target.parameters(), agent.critic.parameters(),
                        strict=True):
            t.copy_(o + 1.0)
    target0 = params_of(agent.critic_target)
    gen = torch.Generator().manual_seed(2)
    tid = torch.arange(K).repeat_interleave(4)
    b = Batch(obs=make_obs(tid, gen), action=torch.rand(12, ACT, generator=gen) * 2 - 1,
              reward=torch.randn(12, generator=gen), next_obs=make_obs(tid, gen),
              done=torch.zeros(12), task_id=tid)
    assert agent.update(b)["skipped"] == 0
    critic1, target1 = params_of(agent.critic), params_of(agent.critic_target)
    for k in target0:
        moved = target1[k] - target0[k]
        torch.testing.assert_close(moved, 0.25 * (critic1[k] - target0[k]), rtol=0, atol=1e-6)
        assert (moved - -0.25).abs().max() < 0.01, k  # the critic step itself is ~3e-4
