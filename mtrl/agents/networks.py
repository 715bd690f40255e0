"""Networks of the multi-task SAC agent: MLPs, a tanh-Gaussian actor and a twin critic.

* :func:`mlp` builds a plain ReLU MLP.
* :class:`EnsembleLinear` holds ``E`` independent linear layers as one stacked weight
  ``[E, in, out]`` and evaluates them in one call; the :class:`TwinCritic` is an MLP of
  these, so both Q functions are **one** module with stacked parameters.
* :class:`SquashedGaussianActor` is the tanh-squashed Gaussian policy.
* Both networks take ``num_heads``: with ``num_heads = K > 1`` the hidden trunk is shared
  and the last layer has one output head per task, picked by the task id (MTMH-SAC).
  All heads are computed in one matrix product and the task's slice is gathered, so a
  batch may mix tasks freely and the code runs unchanged under ``torch.func.vmap``.

Inputs are never split by task here: the one-hot task id stays part of the observation
(as in the mtrl / Meta-World MT-SAC baselines); ``task_id`` only selects the head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "EnsembleLinear",
    "SquashedGaussianActor",
    "TwinCritic",
    "mlp",
    "select_head",
    "tanh_gaussian_log_prob",
]

_LOG_2 = math.log(2.0)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def mlp(in_dim: int, hidden_sizes: Sequence[int], out_dim: int) -> nn.Sequential:
    """A ReLU MLP ``in_dim -> hidden_sizes... -> out_dim`` (no output activation)."""
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden_sizes:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


class EnsembleLinear(nn.Module):
    """``E`` independent linear layers evaluated together.

    ``weight`` is ``[E, in, out]`` and ``bias`` ``[E, 1, out]``; ``forward`` maps
    ``x`` of shape ``(E, N, in)`` (or ``(N, in)``, shared by all members) to
    ``(E, N, out)`` (one ``addmm`` per member). Each member is initialised like ``nn.Linear``
    (uniform in ``±1/sqrt(in)``), and member ``e`` computes exactly
    ``x[e] @ weight[e] + bias[e]``, i.e. ``nn.Linear`` with weight ``weight[e].T``.
    """

    def __init__(self, num_members: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.num_members, self.in_dim, self.out_dim = num_members, in_dim, out_dim
        self.weight = nn.Parameter(torch.empty(num_members, in_dim, out_dim))
        self.bias = nn.Parameter(torch.empty(num_members, 1, out_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_dim)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        # One addmm per member rather than one baddbmm: the same FLOPs, but under
        # ``torch.func.vmap`` (per-task gradients) mm's batching rule folds the task
        # dimension into the rows, while bmm's copies the weight once per task
        # (measured in scripts/bench_balancers.py: the critic's batched gradients at K=50).
        # ``unbind`` (not ``weight[e]``): its backward stacks the members' gradients into
        # one tensor, where indexing would zero-fill a full-size gradient per member.
        xs = [x] * self.num_members if x.ndim == 2 else x.unbind(0)
        return torch.stack([
            torch.addmm(b, xe, w)
            for b, xe, w in zip(self.bias.unbind(0), xs, self.weight.unbind(0), strict=True)
        ])

    def extra_repr(self) -> str:
        return f"num_members={self.num_members}, in_dim={self.in_dim}, out_dim={self.out_dim}"


def select_head(y: Tensor, task_id: Tensor | None, num_heads: int, out_dim: int) -> Tensor:
    """Pick each row's task head from all heads' outputs.

    ``y`` is ``(..., N, num_heads * out_dim)`` (head-major in the last dim) and
    ``task_id`` ``(N,)`` long; returns ``(..., N, out_dim)``. With one head ``y`` is
    returned as is and ``task_id`` may be ``None``.
    """
    if num_heads == 1:
        return y
    if task_id is None:
        raise ValueError("a multi-head network needs task_id")
    y = y.unflatten(-1, (num_heads, out_dim))  # (..., N, H, out)
    idx = task_id.view(*([1] * (y.ndim - 3)), -1, 1, 1)
    idx = idx.expand(*y.shape[:-2], 1, out_dim)
    return y.gather(-2, idx).squeeze(-2)


class TwinCritic(nn.Module):
    """Two Q networks ``Q(s, a)`` evaluated as one batched ensemble forward.

    ``forward(obs, action, task_id=None)`` returns ``(2, N)``: row ``e`` is ``Q_e``.
    With ``num_heads > 1`` the trunk is shared by the tasks (each Q has its own trunk)
    and the output layer has one head per task.
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden_sizes: Sequence[int] = (400, 400, 400),
        num_heads: int = 1,
        num_members: int = 2,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_members = num_heads, num_members
        dims = [obs_dim + act_dim, *hidden_sizes]
        self.trunk = nn.ModuleList(
            EnsembleLinear(num_members, d_in, d_out)
            for d_in, d_out in zip(dims[:-1], dims[1:], strict=True)
        )
        self.head = EnsembleLinear(num_members, dims[-1], num_heads)

    def forward(self, obs: Tensor, action: Tensor, task_id: Tensor | None = None) -> Tensor:
        h = torch.cat([obs, action], dim=-1)
        for layer in self.trunk:
            h = F.relu(layer(h))
        q = select_head(self.head(h), task_id, self.num_heads, 1)  # (E, N, 1)
        return q.squeeze(-1)


def tanh_gaussian_log_prob(pre_tanh: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """``log π(tanh(u))`` for ``u ~ N(mean, exp(log_std))``, summed over the last dim.

    Change of variables: ``log N(u) - Σ log(1 - tanh(u)^2)``, with the correction written
    as ``2 (log 2 - u - softplus(-2u))`` (exact and stable for large ``|u|``, no epsilon).
    """
    z = (pre_tanh - mean) * torch.exp(-log_std)
    log_n = -0.5 * z.pow(2) - log_std - _HALF_LOG_2PI
    corr = 2.0 * (_LOG_2 - pre_tanh - F.softplus(-2.0 * pre_tanh))
    return (log_n - corr).sum(-1)


class SquashedGaussianActor(nn.Module):
    """Tanh-squashed diagonal Gaussian policy ``a = tanh(μ + σ ε)``, ``ε ~ N(0, I)``.

    The log-std is bounded smoothly, as in mtrl / CleanRL:
    ``log σ = lo + (hi - lo) (tanh(raw) + 1) / 2`` with ``(lo, hi) = log_std_bounds``
    (default ``(-20, 2)``, mtrl's values).

    ``forward(obs, task_id=None, eps=None)`` returns ``(action, log_prob, mean_action)``
    with shapes ``(N, act_dim)``, ``(N,)``, ``(N, act_dim)``; ``mean_action = tanh(μ)`` is
    the deterministic action. Pass ``eps`` (the reparameterisation noise) to make the
    forward deterministic (needed under ``vmap``); without it, noise is drawn here.
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden_sizes: Sequence[int] = (400, 400, 400),
        num_heads: int = 1,
        log_std_bounds: tuple[float, float] = (-20.0, 2.0),
    ) -> None:
        super().__init__()
        lo, hi = (float(b) for b in log_std_bounds)
        if not lo < hi:
            raise ValueError(f"log_std_bounds must satisfy low < high, got {log_std_bounds}")
        self.act_dim, self.num_heads = act_dim, num_heads
        self.log_std_bounds = (lo, hi)
        self.trunk = mlp(obs_dim, hidden_sizes[:-1], hidden_sizes[-1]) if hidden_sizes else None
        feat = hidden_sizes[-1] if hidden_sizes else obs_dim
        self.head = nn.Linear(feat, num_heads * 2 * act_dim)

    def distribution_params(
        self, obs: Tensor, task_id: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Mean and bounded log-std of the pre-tanh Gaussian, each ``(N, act_dim)``."""
        h = F.relu(self.trunk(obs)) if self.trunk is not None else obs
        out = select_head(self.head(h), task_id, self.num_heads, 2 * self.act_dim)
        mean, raw_log_std = out.chunk(2, dim=-1)
        lo, hi = self.log_std_bounds
        log_std = lo + 0.5 * (hi - lo) * (torch.tanh(raw_log_std) + 1.0)
        return mean, log_std

    def forward(
        self, obs: Tensor, task_id: Tensor | None = None, eps: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        mean, log_std = self.distribution_params(obs, task_id)
        if eps is None:
            eps = torch.randn_like(mean)
        u = mean + torch.exp(log_std) * eps
        # log N(u; mean, std) from eps directly: -eps²/2 - log std - log(2π)/2.
        log_n = -0.5 * eps.pow(2) - log_std - _HALF_LOG_2PI
        corr = 2.0 * (_LOG_2 - u - F.softplus(-2.0 * u))
        log_prob = (log_n - corr).sum(-1)
        return torch.tanh(u), log_prob, torch.tanh(mean)
