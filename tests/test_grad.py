"""Tests of the per-task gradient plumbing (mtrl/grad.py): exactness, .grad, statistics."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from mtrl.balancers import Balancer, build, names
from mtrl.grad import (
    BalanceStats,
    balanced_backward,
    balanced_backward_from_losses,
    gram_stats,
    task_gradients,
    task_losses,
)

K, B_PER_TASK, OBS, ACT = 4, 5, 3, 2


# ------------------------------------------------------------------ fixtures / helpers
class Twin(nn.Module):
    """A small twin critic like SAC's: two ReLU MLPs on [obs, one-hot task, action]."""

    def __init__(self, in_dim: int, hidden: int = 8) -> None:
        super().__init__()

        def mlp() -> nn.Sequential:
            return nn.Sequential(
                nn.Linear(in_dim, hidden), nn.ReLU(),
                nn.Linear(hidden, hidden), nn.ReLU(),
                nn.Linear(hidden, 1),
            )  # fmt: skip

        self.q1, self.q2 = mlp(), mlp()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)


def make_problem(k: int = K, seed: int = 0):
    """A twin critic (float64) and a task-major batch (obs+one-hot, action, target)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = Twin(OBS + k + ACT).double()
    obs = torch.randn(k, B_PER_TASK, OBS, generator=gen, dtype=torch.float64)
    onehot = torch.eye(k, dtype=torch.float64)[:, None, :].expand(k, B_PER_TASK, k)
    x = torch.cat([obs, onehot, torch.randn(k, B_PER_TASK, ACT, generator=gen).double()], -1)
    target = torch.randn(k, B_PER_TASK, generator=gen, dtype=torch.float64)

    def loss_fn(params: dict[str, Tensor], x: Tensor, target: Tensor) -> Tensor:
        q1, q2 = functional_call(net, params, (x,))
        return ((q1 - target) ** 2).mean() + ((q2 - target) ** 2).mean()

    return net, loss_fn, (x, target)


def loop_gradients(net: nn.Module, loss_fn, batch) -> tuple[Tensor, Tensor]:
    """Reference: K separate forward + torch.autograd.grad calls."""
    params = dict(net.named_parameters())
    losses, rows = [], []
    for k in range(batch[0].shape[0]):
        loss = loss_fn(params, *(t[k] for t in batch))
        grads = torch.autograd.grad(loss, list(params.values()))
        losses.append(loss.detach())
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(losses), torch.stack(rows)


def flat_grad(net: nn.Module) -> Tensor:
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()])


class FixedWeights(Balancer):
    """Gramian-based test balancer: fixed weights, records the rows it was given."""

    name = "test-fixed"

    def __init__(self, w, sample: list[int] | None = None) -> None:
        super().__init__()
        self.w = torch.as_tensor(w, dtype=torch.float64)
        self.sample = sample
        self.seen_grads: Tensor | None = None
        self.seen_losses: Tensor | None = None
        self.seen_gram: Tensor | None = None

    def weights(self, gram, losses):
        self.seen_gram = gram
        return self.w.clone()

    def select(self, num_tasks):
        return None if self.sample is None else torch.tensor(self.sample)

    def combine_rows(self, grads, losses=None):
        self.seen_grads, self.seen_losses = grads.clone(), losses
        return super().combine_rows(grads, losses)


# ------------------------------------------------------------------ exactness
def test_task_gradients_match_python_loop():
    net, loss_fn, batch = make_problem()
    ref_losses, ref_grads = loop_gradients(net, loss_fn, batch)
    losses, grads = task_gradients(loss_fn, dict(net.named_parameters()), batch)
    d = sum(p.numel() for p in net.parameters())
    assert grads.shape == (K, d) and grads.dtype == torch.float64
    assert not grads.requires_grad and not losses.requires_grad
    torch.testing.assert_close(losses, ref_losses, atol=1e-10, rtol=0)
    torch.testing.assert_close(grads, ref_grads, atol=1e-10, rtol=0)
    # no .grad written by task_gradients
    assert all(p.grad is None for p in net.parameters())


def test_task_gradients_subset_rows_in_given_order():
    net, loss_fn, batch = make_problem()
    ref_losses, ref_grads = loop_gradients(net, loss_fn, batch)
    tasks = torch.tensor([3, 0])
    losses, grads = task_gradients(loss_fn, dict(net.named_parameters()), batch, tasks)
    torch.testing.assert_close(grads, ref_grads[tasks], atol=1e-10, rtol=0)
    torch.testing.assert_close(losses, ref_losses[tasks], atol=1e-10, rtol=0)


def test_task_losses_one_vmapped_forward_is_differentiable():
    net, loss_fn, batch = make_problem()
    ref_losses, ref_grads = loop_gradients(net, loss_fn, batch)
    losses = task_losses(loss_fn, dict(net.named_parameters()), batch)
    torch.testing.assert_close(losses.detach(), ref_losses, atol=1e-10, rtol=0)
    losses[1].backward()
    torch.testing.assert_close(flat_grad(net), ref_grads[1], atol=1e-10, rtol=0)


def test_from_losses_batched_backward_matches_python_loop():
    net, loss_fn, batch = make_problem()
    _, ref_grads = loop_gradients(net, loss_fn, batch)
    # a non-separable style computation: one full-batch forward, a (K,) loss vector
    x, target = (t.reshape(K * B_PER_TASK, *t.shape[2:]) for t in batch)
    q1, q2 = net(x)
    per_sample = (q1 - target) ** 2 + (q2 - target) ** 2
    losses = per_sample.view(K, B_PER_TASK).mean(1)
    w = [0.4, 0.3, 0.2, 0.1]
    bal = FixedWeights(w)
    stats = balanced_backward_from_losses(losses, list(net.parameters()), bal)
    torch.testing.assert_close(bal.seen_grads, ref_grads, atol=1e-10, rtol=0)
    expected = torch.tensor(w, dtype=torch.float64) @ ref_grads
    torch.testing.assert_close(flat_grad(net), expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(
        stats.grad_norms, ref_grads.norm(dim=1).float(), atol=1e-5, rtol=1e-5
    )
    # a Gᵀw balancer without its own combine_rows takes the blockwise path
    net.zero_grad(set_to_none=True)
    q1, q2 = net(x)
    losses = ((q1 - target) ** 2 + (q2 - target) ** 2).view(K, B_PER_TASK).mean(1)
    gram_only = GramOnly(w)
    stats = balanced_backward_from_losses(losses, list(net.parameters()), gram_only)
    torch.testing.assert_close(flat_grad(net), expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(gram_only.seen_gram, ref_grads @ ref_grads.T, atol=1e-10, rtol=0)
    torch.testing.assert_close(
        stats.grad_norms, ref_grads.norm(dim=1).float(), atol=1e-5, rtol=1e-5
    )


def test_from_losses_sampling_and_loss_only():
    net, loss_fn, batch = make_problem()
    ref_losses, ref_grads = loop_gradients(net, loss_fn, batch)
    params = dict(net.named_parameters())

    bal = FixedWeights([0.5, 0.5], sample=[2, 1])
    losses = task_losses(loss_fn, params, batch)
    stats = balanced_backward_from_losses(losses, list(params.values()), bal)
    torch.testing.assert_close(bal.seen_grads, ref_grads[[2, 1]], atol=1e-10, rtol=0)
    torch.testing.assert_close(bal.seen_losses, ref_losses[[2, 1]], atol=1e-10, rtol=0)
    torch.testing.assert_close(
        flat_grad(net), 0.5 * (ref_grads[2] + ref_grads[1]), atol=1e-10, rtol=0
    )
    assert stats.weights.tolist() == [0.0, 0.5, 0.5, 0.0]
    assert torch.isnan(stats.grad_norms[[0, 3]]).all()
    assert torch.isfinite(stats.grad_norms[[1, 2]]).all()

    net.zero_grad(set_to_none=True)
    losses = task_losses(loss_fn, params, batch)
    stats = balanced_backward_from_losses(losses, list(params.values()), build("mean"))
    torch.testing.assert_close(flat_grad(net), ref_grads.mean(0), atol=1e-10, rtol=0)
    assert torch.isnan(stats.grad_norms).all() and torch.isnan(stats.mean_cosine)


# ------------------------------------------------------------------ balanced_backward
def test_mean_writes_gradient_of_mean_loss():
    net, loss_fn, batch = make_problem()
    ref_losses, ref_grads = loop_gradients(net, loss_fn, batch)
    stats = balanced_backward(loss_fn, dict(net.named_parameters()), batch, build("mean"))
    assert isinstance(stats, BalanceStats)
    torch.testing.assert_close(flat_grad(net), ref_grads.mean(0), atol=1e-10, rtol=0)
    torch.testing.assert_close(stats.losses, ref_losses, atol=1e-10, rtol=0)
    assert stats.weights.dtype == torch.float32
    torch.testing.assert_close(stats.weights, torch.full((K,), 1 / K))
    # loss-only: no Jacobian, so the gradient statistics are NaN
    assert torch.isnan(stats.grad_norms).all()
    assert torch.isnan(stats.mean_cosine) and torch.isnan(stats.conflict_fraction)


def test_gramian_balancer_writes_weighted_sum_of_rows():
    net, loss_fn, batch = make_problem(k=3)
    ref_losses, ref_grads = loop_gradients(net, loss_fn, batch)
    w = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    bal = FixedWeights(w)
    stats = balanced_backward(loss_fn, dict(net.named_parameters()), batch, bal)
    torch.testing.assert_close(flat_grad(net), w @ ref_grads, atol=1e-10, rtol=0)
    torch.testing.assert_close(bal.seen_losses, ref_losses, atol=1e-10, rtol=0)
    torch.testing.assert_close(bal.seen_gram, ref_grads @ ref_grads.T, atol=1e-10, rtol=0)
    torch.testing.assert_close(stats.weights, w.float())
    torch.testing.assert_close(stats.grad_norms, ref_grads.norm(dim=1).float())
    # each parameter's .grad has its own shape and dtype
    for p in net.parameters():
        assert p.grad.shape == p.shape and p.grad.dtype == p.dtype


class GramOnly(Balancer):
    """Fixed weights through the base class's combine (the blockwise path)."""

    name = "test-gram-only"

    def __init__(self, w) -> None:
        super().__init__()
        self.w = torch.as_tensor(w, dtype=torch.float64)
        self.seen_gram = self.seen_losses = None

    def weights(self, gram, losses):
        self.seen_gram, self.seen_losses = gram, losses
        return self.w.clone()


def test_blockwise_gramian_and_direction_equal_the_row_matrix_ones():
    net, loss_fn, batch = make_problem(k=3)
    ref_losses, ref_grads = loop_gradients(net, loss_fn, batch)
    w = torch.tensor([0.5, -0.2, 0.9], dtype=torch.float64)
    bal = GramOnly(w)
    stats = balanced_backward(
        loss_fn, dict(net.named_parameters()), batch, bal, diagnostics=False
    )
    torch.testing.assert_close(flat_grad(net), w @ ref_grads, atol=1e-10, rtol=0)
    torch.testing.assert_close(bal.seen_gram, ref_grads @ ref_grads.T, atol=1e-10, rtol=0)
    torch.testing.assert_close(bal.seen_losses, ref_losses, atol=1e-10, rtol=0)
    assert bal.seen_gram.dtype == torch.float64 and bal.grads_dtype == torch.float64
    # the statistics come from that Gramian even with diagnostics off
    torch.testing.assert_close(stats.grad_norms, ref_grads.norm(dim=1).float())
    for p in net.parameters():
        assert p.grad.shape == p.shape and p.grad.dtype == p.dtype


def test_balancer_overriding_weights_for_gets_the_row_matrix():
    """A plug-in that overrides ``weights_for(grads, losses)`` keeps working."""

    class OldStyle(GramOnly):
        def weights_for(self, grads, losses):
            self.seen_rows = grads.clone()
            return super().weights_for(grads, losses)

    net, loss_fn, batch = make_problem(k=3)
    _, ref_grads = loop_gradients(net, loss_fn, batch)
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    bal = OldStyle(w)
    balanced_backward(loss_fn, dict(net.named_parameters()), batch, bal)
    torch.testing.assert_close(bal.seen_rows, ref_grads, atol=1e-10, rtol=0)
    torch.testing.assert_close(flat_grad(net), w @ ref_grads, atol=1e-10, rtol=0)


def test_objective_sampling_differentiates_only_sampled_blocks():
    net, loss_fn, batch = make_problem()
    ref_losses, ref_grads = loop_gradients(net, loss_fn, batch)
    # Poison task 1's block: any gradient through it (and its loss) is NaN, so finite
    # results prove that only the sampled rows [3, 0] were differentiated.
    x, target = (t.clone() for t in batch)
    x[1] = float("nan")
    bal = FixedWeights([0.25, 0.75], sample=[3, 0])
    stats = balanced_backward(loss_fn, dict(net.named_parameters()), (x, target), bal)
    assert bal.seen_grads.shape[0] == 2
    torch.testing.assert_close(bal.seen_grads, ref_grads[[3, 0]], atol=1e-10, rtol=0)
    torch.testing.assert_close(bal.seen_losses, ref_losses[[3, 0]], atol=1e-10, rtol=0)
    expected = 0.25 * ref_grads[3] + 0.75 * ref_grads[0]
    torch.testing.assert_close(flat_grad(net), expected, atol=1e-10, rtol=0)
    # all losses are reported (task 1 is NaN only because its input is)
    torch.testing.assert_close(stats.losses[[0, 2, 3]], ref_losses[[0, 2, 3]], atol=1e-10, rtol=0)
    assert torch.isnan(stats.losses[1])
    torch.testing.assert_close(stats.weights, torch.tensor([0.75, 0.0, 0.0, 0.25]))
    assert torch.isnan(stats.grad_norms[[1, 2]]).all()
    torch.testing.assert_close(stats.grad_norms[[3, 0]], ref_grads[[3, 0]].norm(dim=1).float())
    cos = torch.nn.functional.cosine_similarity(ref_grads[3], ref_grads[0], dim=0)
    torch.testing.assert_close(stats.mean_cosine, cos.float())


def linear_problem(rows: list[list[float]]):
    """loss_k = w · x_k, so task k's gradient is exactly rows[k]."""
    w = nn.Parameter(torch.zeros(len(rows[0]), dtype=torch.float64))
    x = torch.tensor(rows, dtype=torch.float64)[:, None, :].expand(-1, 3, -1)  # (K, 3, d)

    def loss_fn(params, xb):
        return (xb @ params["w"]).mean()

    return w, loss_fn, (x,)


def test_statistics_by_hand():
    # pairs: (0,1) inner -1 -> cos -1/sqrt2, conflict; (0,2) inner 0 -> cos 0;
    #        (1,2) inner 2 -> cos 1/sqrt2.  mean cos 0, conflict fraction 1/3.
    w, loss_fn, batch = linear_problem([[1.0, 0.0], [-1.0, 1.0], [0.0, 2.0]])
    stats = balanced_backward(loss_fn, {"w": w}, batch, FixedWeights([1 / 3] * 3))
    torch.testing.assert_close(stats.grad_norms, torch.tensor([1.0, math.sqrt(2), 2.0]))
    torch.testing.assert_close(stats.mean_cosine, torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(stats.conflict_fraction, torch.tensor(1 / 3))
    torch.testing.assert_close(w.grad, torch.tensor([0.0, 1.0], dtype=torch.float64))

    # two exactly opposing tasks: cosine -1, every pair conflicts
    w, loss_fn, batch = linear_problem([[1.0, 2.0], [-2.0, -4.0]])
    stats = balanced_backward(loss_fn, {"w": w}, batch, FixedWeights([0.5, 0.5]))
    torch.testing.assert_close(stats.mean_cosine, torch.tensor(-1.0))
    assert stats.conflict_fraction.item() == 1.0
    for t in stats:
        assert t.dtype in (torch.float32, torch.float64) and t.device.type == "cpu"

    # zero gradient: cosine 0, not NaN; a single row: pair statistics NaN
    norms, mean_cos, conflict = gram_stats(torch.tensor([[0.0, 0.0], [0.0, 4.0]]))
    assert norms.tolist() == [0.0, 2.0] and mean_cos.item() == 0.0 and conflict.item() == 0.0
    norms, mean_cos, conflict = gram_stats(torch.tensor([[9.0]]))
    assert norms.tolist() == [3.0] and torch.isnan(mean_cos) and torch.isnan(conflict)


def test_diagnostics_off_and_gram_reused_from_balancer_info():
    w, loss_fn, batch = linear_problem([[1.0, 0.0], [0.0, 1.0]])
    stats = balanced_backward(loss_fn, {"w": w}, batch, FixedWeights([0.5, 0.5]), diagnostics=False)
    assert torch.isnan(stats.grad_norms).all() and torch.isnan(stats.mean_cosine)
    torch.testing.assert_close(stats.weights, torch.tensor([0.5, 0.5]))

    class RecordsGram(FixedWeights):
        def weights(self, gram, losses):
            self.info["gram"] = torch.tensor([[4.0, -1.0], [-1.0, 9.0]], dtype=torch.float64)
            return super().weights(gram, losses)

    stats = balanced_backward(loss_fn, {"w": w}, batch, RecordsGram([0.5, 0.5]))
    torch.testing.assert_close(stats.grad_norms, torch.tensor([2.0, 3.0]))  # the reused one
    assert stats.conflict_fraction.item() == 1.0


def test_grad_accumulates_like_backward():
    net, loss_fn, batch = make_problem()
    _, ref_grads = loop_gradients(net, loss_fn, batch)
    params = dict(net.named_parameters())
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    balanced_backward(loss_fn, params, batch, FixedWeights([0.25] * K))
    torch.testing.assert_close(flat_grad(net), 1 + ref_grads.mean(0), atol=1e-10, rtol=0)
    # twice in a row (grad set by the first call) and on the loss-only path
    balanced_backward(loss_fn, params, batch, build("mean"))
    torch.testing.assert_close(flat_grad(net), 1 + 2 * ref_grads.mean(0), atol=1e-10, rtol=0)
    net.zero_grad(set_to_none=True)
    balanced_backward(loss_fn, params, batch, FixedWeights([0.25] * K))
    balanced_backward(loss_fn, params, batch, FixedWeights([0.25] * K))
    torch.testing.assert_close(flat_grad(net), 2 * ref_grads.mean(0), atol=1e-10, rtol=0)


@pytest.mark.parametrize("balancer", ["mean", "gram"])
def test_captured_constants_get_no_gradient(balancer):
    """Actor-style loss: the critic is a captured constant (requires_grad=True)."""
    torch.manual_seed(0)
    critic = nn.Linear(3, 1).double()
    actor = nn.Linear(2, 3).double()
    obs = torch.randn(K, 5, 2, dtype=torch.float64)

    def loss_fn(params, o):
        a = functional_call(actor, params, (o,))
        return -critic(torch.tanh(a)).mean()

    bal = build("mean") if balancer == "mean" else FixedWeights([0.25] * K)
    balanced_backward(loss_fn, dict(actor.named_parameters()), (obs,), bal)
    assert all(p.grad is None for p in critic.parameters())
    assert all(p.grad is not None for p in actor.parameters())
    # and the actor gradient is the one of the mean loss
    actor.zero_grad(set_to_none=True)
    loss_fn(dict(actor.named_parameters()), obs).backward(inputs=list(actor.parameters()))
    expected = torch.cat([p.grad.reshape(-1) for p in actor.parameters()])
    actor.zero_grad(set_to_none=True)
    balanced_backward(loss_fn, dict(actor.named_parameters()), (obs,), bal)
    torch.testing.assert_close(flat_grad(actor), expected, atol=1e-10, rtol=0)


def test_weights_nan_when_balancer_reports_none():
    class NoWeights(Balancer):
        name = "test-no-weights"

        def combine_rows(self, grads, losses=None):
            return grads.sum(0)

    net, loss_fn, batch = make_problem()
    _, ref_grads = loop_gradients(net, loss_fn, batch)
    bal = NoWeights()
    bal.info["weights"] = torch.ones(K, dtype=torch.float64)  # stale: must not be reported
    stats = balanced_backward(loss_fn, dict(net.named_parameters()), batch, bal)
    assert torch.isnan(stats.weights).all()
    torch.testing.assert_close(flat_grad(net), ref_grads.sum(0), atol=1e-10, rtol=0)
    assert torch.isfinite(stats.grad_norms).all()


def test_clear_errors():
    net, loss_fn, batch = make_problem()
    params = dict(net.named_parameters())
    with pytest.raises(ValueError, match="leading task dimension"):
        balanced_backward(loss_fn, params, (batch[0], batch[1][:2]), build("mean"))
    with pytest.raises(ValueError, match="sequence of tensors"):
        task_gradients(loss_fn, params, batch[0])
    with pytest.raises(ValueError, match="non-empty dict"):
        task_gradients(loss_fn, {}, batch)
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
        balanced_backward(loss_fn, params, batch, FixedWeights([1.0], sample=[7]))
    with pytest.raises(ValueError, match="must not repeat"):
        task_gradients(loss_fn, params, batch, torch.tensor([1, 1]))


@pytest.mark.parametrize("name", names())
def test_registered_balancers_run_through_the_plumbing(name):
    """Every registered balancer (defaults) runs end to end and writes finite grads."""
    try:
        bal = build(name)
    except ValueError:
        pytest.skip(f"{name} has required hyper-parameters")
    net, loss_fn, batch = make_problem()
    stats = balanced_backward(loss_fn, dict(net.named_parameters()), batch, bal)
    assert torch.isfinite(flat_grad(net)).all()
    assert stats.losses.shape == stats.weights.shape == stats.grad_norms.shape == (K,)
    # The plumbing (blockwise Gramian and direction for Gᵀw balancers) gives what a
    # fresh, identical balancer's public combine gives on the full (K, D) matrix.
    ref_losses, ref_grads = loop_gradients(net, loss_fn, batch)
    expected = build(name).combine(ref_grads, ref_losses)
    torch.testing.assert_close(flat_grad(net), expected, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("balancer", ["mean", "gram"])
def test_frozen_params_are_left_alone(balancer):
    net, loss_fn, batch = make_problem()
    _, ref_grads = loop_gradients(net, loss_fn, batch)
    frozen = net.q1[0].weight
    frozen.requires_grad_(False)
    keep = torch.cat(
        [torch.full((p.numel(),), p is not frozen, dtype=torch.bool) for p in net.parameters()]
    )
    bal = build("mean") if balancer == "mean" else FixedWeights([0.25] * K)
    balanced_backward(loss_fn, dict(net.named_parameters()), batch, bal)
    assert frozen.grad is None
    got = torch.cat([p.grad.reshape(-1) for p in net.parameters() if p is not frozen])
    torch.testing.assert_close(got, ref_grads.mean(0)[keep], atol=1e-10, rtol=0)


@pytest.mark.parametrize("balancer", ["mean", "fixed"])
def test_frozen_entries_still_reach_loss_fn(balancer):
    """loss_fn reads every name it was given, frozen ones included (as constants)."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=gen, dtype=torch.float64)  # frozen
    x = torch.randn(K, 5, 3, generator=gen, dtype=torch.float64)

    def loss_fn(p, x):
        return ((x @ p["w"].T + p["b"]) ** 2).mean()

    ref = torch.autograd.grad(sum(loss_fn({"w": w, "b": b}, x[k]) for k in range(K)) / K, w)[0]
    bal = build("mean") if balancer == "mean" else FixedWeights([1 / K] * K)
    balanced_backward(loss_fn, {"w": w, "b": b}, (x,), bal)
    torch.testing.assert_close(w.grad, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("balancer", ["mean", "fixed"])
def test_a_graph_captured_by_loss_fn_is_a_constant_for_every_balancer_kind(balancer):
    """A buffer computed from a listed parameter (captured by loss_fn) gives that
    parameter no gradient, for the loss-only path as for the per-task one."""
    gen = torch.Generator().manual_seed(4)
    scale = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    derived = scale * 2.0  # keeps its graph to `scale`
    x = torch.randn(K, 5, 3, generator=gen, dtype=torch.float64)

    def loss_fn(p, x):
        return ((x @ p["w"]) * derived + p["scale"]).pow(2).mean()

    bal = build("mean") if balancer == "mean" else FixedWeights([1 / K] * K)
    balanced_backward(loss_fn, {"w": w, "scale": scale}, (x,), bal)
    through_argument = torch.autograd.grad(
        sum(((x[k] @ w) * derived.detach() + scale).pow(2).mean() for k in range(K)) / K,
        scale)[0]  # fmt: skip
    torch.testing.assert_close(scale.grad, through_argument, atol=1e-12, rtol=0)


def test_a_tensor_named_twice_is_refused():
    w = torch.randn(3, 3, requires_grad=True)
    with pytest.raises(ValueError, match="same tensor twice"):
        balanced_backward(lambda p, x: (x @ p["a"] @ p["b"]).sum(), {"a": w, "b": w},
                          (torch.randn(K, 2, 3),), build("mean"))  # fmt: skip
    with pytest.raises(ValueError, match="same tensor twice"):
        balanced_backward_from_losses(torch.stack([(w * k).sum() for k in range(K)]), [w, w],
                                      build("mean"))  # fmt: skip


def test_gram_stats_keep_the_gramian_range():
    from mtrl.grad import gram_stats

    for scale in (1e-25, 1e20):
        g = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64) * scale
        norms, cos, conflict = gram_stats(g @ g.T)
        torch.testing.assert_close(norms, torch.tensor([1.0, 2**0.5]) * scale, rtol=1e-6, atol=0)
        assert abs(float(cos) - 2**-0.5) < 1e-6 and float(conflict) == 0.0


def test_loss_only_gradients_are_separate_tensors_in_the_callers_order():
    """Two parameters that meet in a sum get their own .grad tensors (one tensor for both
    let an in-place clip of one change the other), and loss_fn sees the caller's order."""
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    frozen = torch.randn(3, generator=gen, dtype=torch.float64)
    x = torch.randn(K, 4, 3, generator=gen, dtype=torch.float64)
    seen = []

    def loss_fn(p, x):
        seen.append(list(p))
        return ((p["a"] + p["b"] + p["c"]) * x).sum()

    balanced_backward(loss_fn, {"a": a, "c": frozen, "b": b}, (x,), build("mean"))
    assert seen[-1] == ["a", "c", "b"]
    assert a.grad.data_ptr() != b.grad.data_ptr()
    want = x.sum((0, 1)) / K
    a.grad.mul_(0.5)
    torch.testing.assert_close(b.grad, want, atol=1e-12, rtol=0)


def test_weights_and_statistics_reach_the_device_in_few_copies(monkeypatch):
    """On CUDA every host-to-device copy of a CPU tensor from pageable memory blocks the
    host until the GPU queue drains. The weights were copied once per parameter (8 for
    this net) and the statistics in 4 more copies; now the weights go once per (device,
    dtype) and the statistics with the weights in one packed copy. Counted here on the
    CPU through the one helper every such copy goes through."""
    import mtrl.balancers.base
    import mtrl.grad

    calls, moved = [], []
    real = mtrl.balancers.base.to_device

    def counting(t, device, dtype=None):
        # a tensor that came out of an earlier call (or a view of one) is on the device
        # already: no copy on CUDA either
        if not any(t is m or t._base is m for m in moved):
            calls.append(tuple(t.shape))
        out = real(t, device, dtype)
        moved.append(out)
        return out

    monkeypatch.setattr(mtrl.grad, "to_device", counting)
    monkeypatch.setattr(mtrl.balancers.base, "to_device", counting)  # (placed_weights)
    net, loss_fn, batch = make_problem(k=3)
    assert len(list(net.parameters())) > 2
    for diagnostics in (True, False):
        calls.clear()
        stats = balanced_backward(loss_fn, dict(net.named_parameters()), batch,
                                  build("mgda"), diagnostics=diagnostics)
        # w for the .grad write; norms (3) + cosine + conflict + weights (3) packed
        assert calls == [(3,), (3 + 2 + 3,)], calls
        assert torch.isfinite(stats.grad_norms).all() and torch.isfinite(stats.weights).all()
        torch.testing.assert_close(stats.weights.sum(), torch.tensor(1.0))
    calls.clear()  # loss-only: the weights once (they were copied twice)
    balanced_backward(loss_fn, dict(net.named_parameters()), batch, build("mean"))
    assert calls == [(3,)], calls


def test_to_device_is_to_on_the_cpu():
    from mtrl.balancers.base import to_device

    t = torch.arange(4, dtype=torch.float64)
    assert to_device(t, "cpu") is t
    out = to_device(t, torch.device("cpu"), torch.float32)
    assert out.dtype == torch.float32 and torch.equal(out, t.float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_device_copies_to_cuda_without_blocking_and_keeps_the_values():
    from mtrl.balancers.base import to_device

    t = torch.randn(1000, dtype=torch.float64)
    expected = t.float()
    out = to_device(t, "cuda", torch.float32)
    assert out.device.type == "cuda" and out.dtype == torch.float32
    del t  # the pinned staging copy is kept until the copy has run
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), expected)
    again = to_device(torch.arange(5), "cuda")
    assert again.cpu().tolist() == [0, 1, 2, 3, 4]


def test_grad_write_keeps_weights_beyond_the_gradients_dtype():
    """FairGrad's weights of gradients ~1e-30 are ~1e40: cast to float32 they were inf and
    the .grad NaN (and weights ~1e-35 subnormal). Such weights are applied in float64."""
    from mtrl.balancers.base import weighted_sum, weights_fit
    from mtrl.grad import _write_grad_pieces

    piece = torch.randn(2, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for w in (torch.tensor([1e40, 2e40], dtype=torch.float64),
              torch.tensor([3e-35, 1e-35], dtype=torch.float64)):
        small = (piece * (1e-30 if w[0] > 1 else 1e25)).float()
        want = w @ small.double()
        assert not weights_fit(w, torch.float32) and weights_fit(w, torch.float64)
        p = torch.zeros(5, requires_grad=True)
        _write_grad_pieces([p], w, [small])
        torch.testing.assert_close(p.grad.double(), want, rtol=1e-6, atol=0)
        torch.testing.assert_close(weighted_sum(w, small).double(), want, rtol=1e-6, atol=0)
    assert weights_fit(torch.tensor([0.3, 0.7], dtype=torch.float64), torch.float32)
