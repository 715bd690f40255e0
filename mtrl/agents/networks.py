"""Networks of the multi-task SAC agent: MLPs, a tanh-Gaussian actor and a twin critic.

* :func:`mlp` builds a plain ReLU MLP: :class:`mtrl.onednn.MLP`, an ``nn.Sequential`` of
  ``Linear``/``ReLU`` whose float32 CPU forward and backward run as one oneDNN-backed
  function (same parameters and state dict as an ``nn.Sequential`` of ``nn.Linear``).
* :class:`TwinCritic` holds both Q functions in **one** module: one ``forward`` call
  returns both rows, ``(2, N)``.
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

from mtrl.onednn import MLP, Linear

__all__ = [
    "SquashedGaussianActor",
    "TwinCritic",
    "mlp",
    "select_head",
    "tanh_gaussian_log_prob",
]

_LOG_2 = math.log(2.0)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def mlp(in_dim: int, hidden_sizes: Sequence[int], out_dim: int) -> MLP:
    """A ReLU MLP ``in_dim -> hidden_sizes... -> out_dim`` (no output activation)."""
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden_sizes:
        layers += [Linear(d, h), nn.ReLU()]
        d = h
    layers.append(Linear(d, out_dim))
    return MLP(*layers)


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
    """Two Q networks ``Q(s, a)`` in one module, evaluated by one ``forward`` call.

    ``forward(obs, action, task_id=None)`` returns ``(2, N)``: row ``e`` is ``Q_e``.
    ``members[e]`` is an ordinary :func:`mlp`. With
    ``num_heads > 1`` each member's trunk is shared by the tasks and its output layer has
    one head per task.

    Why not one stacked ``[2, in, out]`` weight per layer (an "ensemble linear"): under
    ``torch.func.vmap`` over task blocks (the per-task gradients of
    :mod:`mtrl.grad`), ``baddbmm`` copies the weight once per task, and per-member
    slices of a stacked weight add a gather/stack of every per-task gradient; measured
    with ``scripts/bench_balancers.py`` (K=10, 1 thread), per-task critic gradients plus
    Gramian cost 1.2-1.3× a plain backward with two ``nn.Linear`` MLPs against 1.5-1.8×
    with stacked weights (both measured with torch's own ``nn.Linear``). The forward
    FLOPs are the same.
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
        self.members = nn.ModuleList(
            mlp(obs_dim + act_dim, hidden_sizes, num_heads) for _ in range(num_members)
        )

    def forward(self, obs: Tensor, action: Tensor, task_id: Tensor | None = None) -> Tensor:
        x = torch.cat([obs, action], dim=-1)
        y = torch.stack([member(x) for member in self.members])  # (E, N, num_heads)
        return select_head(y, task_id, self.num_heads, 1).squeeze(-1)


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
        self.head = Linear(feat, num_heads * 2 * act_dim)

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
