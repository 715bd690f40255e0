"""mtrl.grad's loss-only and from-losses paths (weights under task sampling, retain_graph,
frozen and unused parameters), with numbers worked by hand."""

from __future__ import annotations

import torch

from mtrl.balancers import Balancer
from mtrl.grad import balanced_backward_from_losses


class SampledLossOnly(Balancer):
    """Loss-only balancer that samples tasks [2, 0] (not in sorted order) and gives them
    fixed weights; records the losses it was given."""

    name = "test-sampled-loss-only"
    needs_grads = False

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[float] = []

    def select(self, num_tasks):
        return torch.tensor([2, 0])

    def weights(self, gram, losses):
        self.seen = losses.tolist()
        return torch.tensor([0.25, 0.75], dtype=torch.float64)


def test_loss_only_sampling_reports_weights_at_the_sampled_tasks():
    """Losses p_k² at p = (1, 2, 3): (1, 4, 9). Sampled rows [2, 0] have losses (9, 1) and
    weights (0.25, 0.75), so task 2 gets 0.25 and task 0 gets 0.75 in the reported
    weights (in task order: 0.75, 0, 0.25), and .grad = (0.75·2·1, 0, 0.25·2·3)."""
    p = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    bal = SampledLossOnly()
    stats = balanced_backward_from_losses(p**2, [p], bal)
    assert bal.seen == [9.0, 1.0]
    assert stats.weights.tolist() == [0.75, 0.0, 0.25]
    assert p.grad.tolist() == [1.5, 0.0, 1.5]
    assert stats.losses.tolist() == [1.0, 4.0, 9.0]


class Fixed(Balancer):
    """Gradient balancer with fixed weights (direction Gᵀw, blockwise path)."""

    name = "test-fixed-extra"

    def __init__(self, w) -> None:
        super().__init__()
        self.w = torch.as_tensor(w, dtype=torch.float64)

    def weights(self, gram, losses):
        return self.w.clone()


def test_from_losses_keeps_the_graph_when_asked():
    """``retain_graph=True`` keeps the loss graph for a second backward, on the Jacobian
    path too (losses p_k², p = (1, 2): .grad = w·2p = (0.5·2, 0.5·4) = (1, 2))."""
    p = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    losses = p**2
    balanced_backward_from_losses(losses, [p], Fixed([0.5, 0.5]), retain_graph=True)
    assert p.grad.tolist() == [1.0, 2.0]
    losses.sum().backward()  # the graph is still there: adds 2p
    assert p.grad.tolist() == [3.0, 6.0]


def test_from_losses_skips_frozen_parameters():
    """A tensor with ``requires_grad=False`` in ``params`` is left alone, as
    ``Tensor.backward`` would (no error, no .grad): losses (p_1 c, p_2 c), c frozen."""
    p = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    c = torch.tensor(3.0, dtype=torch.float64)
    balanced_backward_from_losses(p * c, [p, c], Fixed([0.5, 0.25]))
    assert p.grad.tolist() == [1.5, 0.75] and c.grad is None


def test_loss_only_balancer_gives_unused_parameters_a_zero_gradient():
    """On the loss-only path a parameter that ``loss_fn`` does not use gets a zero
    ``.grad`` (as on the gradient path), not ``None``: optimisers then treat every listed
    parameter alike. Loss of task k: a·mean(x_k); x = ((1, 3), (5, 7)); mean weights
    ½: .grad of a = ½ (2 + 6) = 4."""
    from mtrl.balancers import build
    from mtrl.grad import balanced_backward

    a = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    unused = torch.tensor([1.0, 1.0], dtype=torch.float64, requires_grad=True)
    x = torch.tensor([[1.0, 3.0], [5.0, 7.0]], dtype=torch.float64)

    def loss_fn(params, block):
        return params["a"] * block.mean()

    balanced_backward(loss_fn, {"a": a, "unused": unused}, (x,), build("mean"))
    assert a.grad.item() == 4.0
    assert unused.grad is not None and unused.grad.tolist() == [0.0, 0.0]


def test_loss_only_path_adds_a_dense_gradient_to_a_sparse_one():
    """An Embedding(sparse=True) whose .grad holds a sparse gradient from an earlier
    backward: `sparse + dense` raised "add(sparse, dense) is not supported"; like
    Tensor.backward(), the sum is now kept (as a dense tensor)."""
    from mtrl.balancers import build
    from mtrl.grad import balanced_backward

    torch.manual_seed(0)
    emb = torch.nn.Embedding(5, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    earlier = emb.weight.grad.to_dense().clone()
    x = torch.randn(2, 4, 3)
    balanced_backward(lambda p, x: (x @ p["weight"].T).pow(2).mean(),
                      dict(emb.named_parameters()), [x], build("mean"))
    w = emb.weight.detach().requires_grad_()
    loss = torch.stack([(x[i] @ w.T).pow(2).mean() for i in range(2)]).mean()
    (g,) = torch.autograd.grad(loss, w)
    torch.testing.assert_close(emb.weight.grad.to_dense(), earlier + g)
