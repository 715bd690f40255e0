"""CUDA paths: skipped where there is no CUDA device (CI, the CPU machines). On a GPU
machine they check what the CPU tests cannot: the balanced plumbing on CUDA against the
CPU, the agent's masked NaN guard and its update without host synchronisation."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from mtrl.agents import MultiTaskSAC, SACConfig, TwinCritic
from mtrl.balancers import build, names
from mtrl.grad import balanced_backward_terms

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

K, N_PER, OBS, ACT = 4, 6, 9, 3
SEEDED = {"pcgrad": {"seed": 0}, "sdmgrad-os": {"seed": 0, "num_sampled": 2}}


def _critic_rows(device: str):
    """A float64 twin critic and task-major rows, the same values on every device."""
    torch.manual_seed(1)
    critic = TwinCritic(OBS, ACT, (16, 16)).double().to(device)
    g = torch.Generator().manual_seed(0)
    rows = (torch.randn(K * N_PER, OBS, generator=g, dtype=torch.float64),
            torch.rand(K * N_PER, ACT, generator=g, dtype=torch.float64) * 2 - 1,
            torch.randn(K * N_PER, generator=g, dtype=torch.float64))

    def terms(params, obs, act, y):
        q = functional_call(critic, params, (obs, act))
        return ((q - y) ** 2).sum(0)

    return critic, terms, tuple(t.to(device) for t in rows)


@pytest.mark.parametrize("name", names())
def test_balanced_gradients_on_cuda_equal_the_cpu(name):
    grads = {}
    for device in ("cpu", "cuda"):
        critic, terms, rows = _critic_rows(device)
        params = dict(critic.named_parameters())
        stats = balanced_backward_terms(terms, params, rows, K, build(name, **SEEDED.get(name, {})))
        assert stats.weights.device.type == device, name
        grads[device] = [p.grad.detach().cpu() for p in params.values()]
    for cpu, cuda in zip(grads["cpu"], grads["cuda"], strict=True):
        torch.testing.assert_close(cuda, cpu, rtol=1e-9, atol=1e-12, msg=name)


def _batch(seed: int, device: str):
    from mtrl.buffers import Batch

    g = torch.Generator().manual_seed(seed)
    task = torch.arange(K).repeat_interleave(N_PER)
    onehot = torch.nn.functional.one_hot(task, K).float()
    b = Batch(obs=torch.cat([torch.randn(task.numel(), OBS, generator=g), onehot], 1),
              action=torch.rand(task.numel(), ACT, generator=g) * 2 - 1,
              reward=torch.randn(task.numel(), generator=g),
              next_obs=torch.cat([torch.randn(task.numel(), OBS, generator=g), onehot], 1),
              done=torch.zeros(task.numel()), task_id=task)
    return b._replace(**{k: v.to(device) for k, v in b._asdict().items()
                         if isinstance(v, torch.Tensor)})


def _agent(name: str) -> MultiTaskSAC:
    torch.manual_seed(0)
    return MultiTaskSAC(OBS + K, ACT, K, SACConfig(hidden_sizes=(32, 32)),
                        lambda: build(name, **SEEDED.get(name, {})), device="cuda")


@pytest.mark.parametrize("name", names())
def test_every_balancer_updates_the_agent_on_cuda(name):
    if name == "famo":  # balances only the critic (SAC's other losses can be negative)
        agent = MultiTaskSAC(OBS + K, ACT, K, SACConfig(hidden_sizes=(32, 32),
                                                        balance=("critic",)),
                             lambda: build(name), device="cuda")
    else:
        agent = _agent(name)
    assert agent.masked_guard  # nan_guard "auto" on CUDA
    before = {k: v.clone() for k, v in agent.critic.state_dict().items()}
    for i in range(3):
        m = agent.update(_batch(i, "cuda"))
        assert all(v.device.type == "cuda" for v in m.values()), name
        assert m["skipped"].item() == 0, name
        assert torch.isfinite(m["critic/losses"]).all(), name
    after = agent.critic.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before), name


def test_masked_guard_undoes_a_nan_update_on_cuda():
    agent = _agent("cagrad")
    agent.update(_batch(0, "cuda"))
    state = {k: v.clone() for k, v in agent.state_dict().items()}
    bad = _batch(1, "cuda")
    bad.reward[0] = float("nan")
    assert agent.update(bad)["skipped"].item() == 1
    for k, v in agent.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_the_mean_update_does_not_synchronise_with_the_host():
    agent = _agent("mean")
    agent.update(_batch(0, "cuda"))  # the first update checks the batch layout (one read)
    batch = _batch(1, "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        agent.update(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
