"""FAMO: fast adaptive multitask optimisation (loss-only balancing)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mtrl.balancers._solvers import check_number, get_buffer64, set_buffer
from mtrl.balancers.base import Balancer
from mtrl.balancers.registry import register

#: Loss shift of the authors' code: ``D = loss − min_loss + 1e-8`` with ``min_loss = 0``.
LOSS_EPS = 1e-8
#: Adam constants (torch defaults, as in the authors' ``torch.optim.Adam``).
BETA1, BETA2, ADAM_EPS = 0.9, 0.999, 1e-8


@register
class FAMO(Balancer):
    """FAMO: weights ``w_i = (z_i/ℓ_i) / Σ_j (z_j/ℓ_j)`` with ``z = softmax(ξ)``.

    The direction ``Gᵀw`` is the gradient of ``Σ_i z_i log ℓ_i`` divided by
    ``c = Σ_j z_j/ℓ_j``; it needs only the losses, so the plumbing runs a single backward
    pass (``needs_grads = False``). After the optimiser step the trainer calls
    :meth:`after_step` with the re-evaluated losses, and the logits ξ take one Adam step
    (lr ``lr``, L2 weight decay ``gamma``) along ``∂softmax(ξ)/∂ξ ᵀ δ`` with
    ``δ = log ℓ_before − log ℓ_after``.

    Paper: Liu, Liang, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization",
    NeurIPS 2023. Authors' code: https://github.com/Cranial-XIX/FAMO (``famo.py``,
    ``mtrl_files/famo.py``).

    Defaults: ``gamma=0.01``, ``lr=0.025`` (the authors' MT10 ``run.sh``).

    State (buffers): ``logits`` ξ, Adam moments ``exp_avg`` / ``exp_avg_sq``, Adam step
    count ``adam_step``, and ``prev_losses`` (the losses seen by the last :meth:`weights`,
    emptied when :meth:`after_step` has used them: one ``after_step`` per ``combine``).

    Deviations from the authors' code: losses are shifted by ``min_loss = 0`` plus 1e-8 as
    they do; Adam is written out (same update as ``torch.optim.Adam`` with
    ``weight_decay``) so its state is in buffers; ξ is float64; their ``max_norm=1``
    gradient clipping is left to the trainer. Their MT10 critic update multiplies the
    weighted log-loss by ``c`` instead of dividing by it (their ``famo.py`` and the paper
    divide); we follow the paper, so the weights sum to 1 (mean scale). Losses must be
    non-negative (the logarithm would be NaN otherwise): negative losses raise
    ``ValueError``; so does calling without losses.
    """

    name = "famo"
    needs_grads = False
    needs_losses_after_step = True
    needs_nonnegative_losses = True

    def __init__(self, gamma: float = 0.01, lr: float = 0.025) -> None:
        super().__init__()
        self.gamma = check_number("gamma", gamma, low=0.0)
        self.lr = check_number("lr", lr, low=0.0, low_open=True)
        for name in ("logits", "exp_avg", "exp_avg_sq", "prev_losses"):
            self.register_buffer(name, torch.empty(0, dtype=torch.float64))
        self.register_buffer("adam_step", torch.zeros((), dtype=torch.int64))

    def _ensure_size(self, k: int) -> None:
        if self.logits.numel() != k:
            for name in ("logits", "exp_avg", "exp_avg_sq"):
                set_buffer(self, name, torch.zeros(k, dtype=torch.float64))
            set_buffer(self, "adam_step", torch.tensor(0))
            set_buffer(self, "prev_losses", torch.empty(0, dtype=torch.float64))

    @staticmethod
    def _shifted(losses: Tensor) -> Tensor:
        if bool((losses < 0).any()):
            raise ValueError(
                f"famo needs non-negative task losses (it balances log-losses), got {losses}"
            )
        return losses + LOSS_EPS

    def weights(self, gram: Tensor | None, losses: Tensor | None) -> Tensor:
        k = losses.shape[0]
        self._ensure_size(k)
        shifted = self._shifted(losses)
        z = torch.softmax(get_buffer64(self, "logits"), 0)
        ratio = z / shifted
        w = ratio / ratio.sum()
        set_buffer(self, "prev_losses", losses)
        self.info["z"] = z
        return w

    def after_step(self, losses_after: Tensor) -> None:
        after = losses_after.detach().to("cpu", torch.float64).reshape(-1)
        prev = get_buffer64(self, "prev_losses")
        if prev.numel() == 0:
            raise RuntimeError(
                "famo.after_step called before combine(grads, losses), or twice after one "
                "combine (each after_step consumes the losses of the combine before it)"
            )
        if after.shape != prev.shape:
            raise ValueError(
                f"losses_after must have shape {tuple(prev.shape)} to match the last "
                f"combine call, got {tuple(after.shape)}"
            )
        if not torch.isfinite(after).all():
            raise ValueError("losses_after contain NaN or Inf")
        delta = torch.log(self._shifted(prev)) - torch.log(self._shifted(after))
        xi = get_buffer64(self, "logits")
        z = torch.softmax(xi, 0)
        # vector-Jacobian product of softmax: (diag(z) - z zᵀ) δ
        grad = z * (delta - (z * delta).sum())
        # Adam with L2 weight decay (torch.optim.Adam semantics)
        grad = grad + self.gamma * xi
        t = int(self.adam_step) + 1
        m = BETA1 * get_buffer64(self, "exp_avg") + (1 - BETA1) * grad
        v = BETA2 * get_buffer64(self, "exp_avg_sq") + (1 - BETA2) * grad * grad
        denom = (v.sqrt() / math.sqrt(1 - BETA2**t)) + ADAM_EPS
        xi = xi - (self.lr / (1 - BETA1**t)) * m / denom
        set_buffer(self, "logits", xi)
        set_buffer(self, "exp_avg", m)
        set_buffer(self, "exp_avg_sq", v)
        set_buffer(self, "adam_step", torch.tensor(t))
        set_buffer(self, "prev_losses", torch.empty(0, dtype=torch.float64))
        self.info["delta"] = delta
