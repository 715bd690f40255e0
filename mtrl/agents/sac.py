"""Multi-task SAC with per-task loss vectors and pluggable balancers.

One agent learns all K tasks. The observation already carries the one-hot task id; the
task id in a batch selects the per-task temperature (and the output head of the
multi-head variant, MTMH-SAC).

**Per-task losses.** Each of the three SAC losses is written as a loss over *one* task's
block of samples (a :data:`mtrl.grad.TaskLossFn`). A stratified batch is task-major
(``x.view(K, B // K, ...)`` gives task k's samples in block k), so the K-vector of task
losses comes from ONE ``vmap``-ed forward over the blocks (no Python loop over tasks):

* critic: ``Σ_{j=1,2} mean (Q_j(s, a) - y)²`` with the target
  ``y = r + γ (1 - done) (min_j Q̄_j(s', a') - α_t log π(a'|s'))`` computed for the whole
  batch under ``no_grad`` first and passed in as data;
* actor: ``mean (α_t log π(ã|s) - min_j Q_j(s, ã))``, ``ã = tanh(μ + σ ε)``, with the
  critic parameters passed as detached constants (no gradient reaches the critic) and the
  noise ``ε`` drawn outside for the whole batch (so the loss is deterministic under vmap);
* temperature: ``mean -log α_t (log π(ã|s) + H̄)``, with ``log π`` detached (the original
  SAC / softlearning form, in log α), ``H̄`` the target entropy and ``α_t`` the temperature
  of the sample's task (or the single shared one). ``log π`` is that of the actor-loss
  samples (same ``ε``) before the actor step, as in mtrl, so one finiteness check guards
  both the actor and the temperature step.

A loss named in ``SACConfig.balance`` goes through
``mtrl.grad.balanced_backward_terms(terms_fn, params, data, K, balancer)`` (on the CPU
with oneDNN one forward and one backward whose layers return per-task weight gradients;
otherwise ``balanced_backward`` with ``vmap`` over the task blocks). The others use the
plain mean over tasks; with equal blocks that is the batch mean of the same per-sample
terms, so it is computed by one ordinary batched forward/backward (no vmap: same numbers as
``task_losses(...).mean().backward()``, ~10% faster on CPU), and the per-task vector is the
block means of those terms. Each balanced loss has its own balancer instance (its own
state), held in ``self.balancers`` so checkpoints save it. If a balancer has
``needs_losses_after_step``, its loss is re-evaluated after the step (same batch, no grad)
and passed to ``balancer.after_step`` (not when the step was skipped).

**Uniform (non-stratified) batches.** If the batch is not task-major (block k not all
task k, or B not divisible by K; as the batch's ``task_major`` says, else checked on
each batch, one host read) the losses are plain batch means of the same per-sample terms
and the logged per-task losses are per-task means over the samples of that task (NaN for a
task absent from the batch). Balancing needs per-task blocks, so a balanced loss with a
non-task-major batch is a ``ValueError``.

**NaN / Inf guard.** Before each optimiser step the losses and the gradient norm are
checked, and ``metrics["skipped"]`` is 1 if anything was non-finite. A non-finite critic
loss or gradient skips the whole update (no weight, optimiser state or target changes); a
non-finite actor or temperature one skips those two steps and the target update, while
the critic step already taken stands. A gradient norm that overflows float32 (> ~1e19) counts
as non-finite. ``SACConfig.nan_guard`` picks how:

* ``"sync"`` (the CPU default): read the device flag (``bool(...)``) after the critic
  backward and after the actor + temperature backward, and return early on a skip
  (gradients dropped; losses of the parts not run are reported as NaN). On the CPU the
  read costs nothing.
* ``"masked"`` (the default on CUDA and other devices with capturable Adam): no host
  read. Every step runs, and afterwards the parameters and the Adam state are put back
  with ``torch.where(ok, new, old)`` on the device; the target update uses weight
  ``tau * ok``. All losses are reported, the ``.grad`` of a skipped step is left as it
  is, and the Adam step counts live on the device (``capturable=True``). A balancer that
  wants the losses after the step (FAMO) reads the flag, since it copies losses to the
  host anyway; gradient balancers sync regardless when they solve their K×K problem on
  the CPU.

In both modes a skipped step also leaves the balancers as they were: their state
(carried weights, caches, a sampler's generator) is snapshotted before each balanced
backward and put back (under "masked" this reads the flags once per update, only when a
balancer keeps state), and the plumbing refuses a non-finite Gramian before any solve.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils import clip_grads_with_norm_, get_total_norm
from torch.optim import optimizer as torch_optimizer

from mtrl.agents.networks import SquashedGaussianActor, TwinCritic
from mtrl.balancers import Balancer
from mtrl.grad import BalanceStats, balanced_backward_terms, mean_of_terms, task_gradients

__all__ = ["LOSS_NAMES", "MultiTaskSAC", "SACConfig"]

#: The losses a balancer can be put on, in update order.
LOSS_NAMES = ("critic", "actor", "alpha")
#: Largest learning rate accepted: Adam moves each weight by up to ~lr per step, so more
#: than 1 destroys a network (and 1e308 overflows float32 at the first step).
MAX_LR = 1.0
#: Largest initial temperature accepted (``α·log π`` must stay far inside float32's range).
MAX_TEMPERATURE = 1e6
#: Accepted range of the actor's ``log_std_bounds`` (float32: ``exp(88)`` overflows, and
#: ``exp(-87)`` is below the normal numbers).
LOG_STD_RANGE = (-50.0, 20.0)
#: Values of ``SACConfig.nan_guard``.
NAN_GUARDS = ("auto", "sync", "masked")
#: Losses that are >= 0 by construction (squared TD errors); the others can be negative.
NONNEGATIVE_LOSSES = ("critic",)


@dataclass(frozen=True)
class SACConfig:
    """Hyper-parameters of multi-task SAC (defaults: the published MT10 setups)."""

    hidden_sizes: tuple[int, ...] = (400, 400, 400)
    """Hidden layer widths of the actor and of each Q network."""
    multihead: bool = False
    """One output head per task on a shared trunk (MTMH-SAC) for actor and critic."""
    actor_lr: float = 3e-4
    """Adam learning rate of the actor."""
    critic_lr: float = 3e-4
    """Adam learning rate of the twin critic."""
    alpha_lr: float = 3e-4
    """Adam learning rate of the log-temperatures."""
    gamma: float = 0.99
    """Discount factor."""
    tau: float = 0.005
    """Polyak averaging rate of the target critic."""
    init_temperature: float = 1.0
    """Initial entropy temperature alpha."""
    shared_temperature: bool = False
    """One temperature for all tasks (default: one learnable temperature per task)."""
    target_entropy: float | None = None
    """Target entropy of the temperature loss; None means -act_dim."""
    log_std_bounds: tuple[float, float] = (-20.0, 2.0)
    """Bounds of the policy's log standard deviation (mtrl's values)."""
    balance: tuple[str, ...] = ("critic", "actor", "alpha")
    """Losses combined by the balancer; the others use the plain mean over tasks."""
    grad_clip: float | None = None
    """Clip each loss's gradient to this global norm before its step (off by default)."""
    nan_guard: Literal["auto", "sync", "masked"] = "auto"
    """NaN/Inf guard: 'sync' (a host read per step; auto on CPU) or 'masked' (undone on device)."""
    # 'auto': 'sync' on the CPU (where the read is free), 'masked' on CUDA and the other
    # devices with capturable Adam. See the module docstring.

    def __post_init__(self) -> None:
        hs = tuple(self.hidden_sizes)
        if any(not isinstance(h, int) or isinstance(h, bool) or h < 1 for h in hs):
            raise ValueError(f"hidden_sizes must be positive integers, got {self.hidden_sizes!r}")
        object.__setattr__(self, "hidden_sizes", hs)
        bal = tuple(self.balance)
        bad = [b for b in bal if b not in LOSS_NAMES]
        if bad:
            raise ValueError(f"balance has unknown loss(es) {bad}; valid: {', '.join(LOSS_NAMES)}")
        if len(set(bal)) != len(bal):
            raise ValueError(f"balance lists a loss twice: {bal!r}")
        object.__setattr__(self, "balance", bal)
        lo, hi = self.log_std_bounds
        # (exp(high) beyond float32's range made every update NaN; exp(low) below its
        # normal numbers, a zero standard deviation)
        if not (math.isfinite(float(lo)) and math.isfinite(float(hi))
                and LOG_STD_RANGE[0] <= float(lo) < float(hi) <= LOG_STD_RANGE[1]):
            raise ValueError(
                f"log_std_bounds must be finite with {LOG_STD_RANGE[0]:g} <= low < high <= "
                f"{LOG_STD_RANGE[1]:g}, got {self.log_std_bounds!r}"
            )
        object.__setattr__(self, "log_std_bounds", (float(lo), float(hi)))
        # (an infinite learning rate or temperature passed the guard's checks: the first
        # step's finite loss and gradient made the weights NaN, and the run stopped later
        # with a misleading "consecutive NaN updates")
        # (a learning rate of 1e308 passed: Adam's first step made the weights inf/NaN; an
        # initial temperature beyond float32's range is inf at once)
        for name, top in (("actor_lr", MAX_LR), ("critic_lr", MAX_LR), ("alpha_lr", MAX_LR),
                          ("init_temperature", MAX_TEMPERATURE)):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value) and value <= top):
                raise ValueError(f"{name} must be a number in (0, {top:g}], got {value!r}")
        if self.target_entropy is not None and not math.isfinite(self.target_entropy):
            raise ValueError(
                f"target_entropy must be a finite number or None, got {self.target_entropy!r}"
            )
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma!r}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {self.tau!r}")
        clip = self.grad_clip
        if clip is not None and not (clip > 0 and math.isfinite(clip)):
            raise ValueError(f"grad_clip must be a finite number > 0 or None, got {clip!r}")
        if self.nan_guard not in NAN_GUARDS:
            raise ValueError(
                f"nan_guard must be one of {', '.join(NAN_GUARDS)}, got {self.nan_guard!r}"
            )


class MultiTaskSAC(nn.Module):
    """Multi-task SAC: tanh-Gaussian actor, batched twin critic, per-task temperatures.

    Args:
        obs_dim: observation size, the trailing ``num_tasks`` one-hot task id included.
        act_dim: action size (actions in ``[-1, 1]``).
        num_tasks: K.
        cfg: hyper-parameters.
        balancer_factory: called once per loss in ``cfg.balance``; must return a new
            :class:`~mtrl.balancers.Balancer` each time (each loss keeps its own state).
        device: where every parameter and tensor of the agent lives.

    ``state_dict()`` holds the networks, the target critic, the log-temperatures and the
    balancers' state; :meth:`optimizer_state_dict` the three Adam optimisers.
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        num_tasks: int,
        cfg: SACConfig,
        balancer_factory: Callable[[], Balancer],
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        if num_tasks < 1 or act_dim < 1 or obs_dim < num_tasks:
            raise ValueError(
                f"need num_tasks >= 1, act_dim >= 1 and obs_dim >= num_tasks (the one-hot), "
                f"got obs_dim={obs_dim}, act_dim={act_dim}, num_tasks={num_tasks}"
            )
        self.obs_dim, self.act_dim, self.num_tasks, self.cfg = obs_dim, act_dim, num_tasks, cfg
        self.device = torch.device(device)
        heads = num_tasks if cfg.multihead else 1
        self.target_entropy = float(-act_dim if cfg.target_entropy is None else cfg.target_entropy)
        with torch.device(self.device):
            self.actor = SquashedGaussianActor(
                obs_dim, act_dim, cfg.hidden_sizes, heads, cfg.log_std_bounds
            )
            self.critic = TwinCritic(obs_dim, act_dim, cfg.hidden_sizes, heads)
            n_alpha = 1 if cfg.shared_temperature else num_tasks
            self.log_alpha = nn.Parameter(torch.full((n_alpha,), math.log(cfg.init_temperature)))
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)

        balancers: dict[str, Balancer] = {}
        for name in cfg.balance:
            b = balancer_factory()
            if not isinstance(b, Balancer):
                raise ValueError(f"balancer_factory must return a Balancer, got {type(b).__name__}")
            if any(b is other for other in balancers.values()):
                raise ValueError("balancer_factory must return a new balancer on every call")
            if b.needs_nonnegative_losses and name not in NONNEGATIVE_LOSSES:
                raise ValueError(
                    f"balancer {b.name!r} needs non-negative task losses, but the SAC {name} "
                    f"loss can be negative; balance only {', '.join(NONNEGATIVE_LOSSES)} with "
                    "it (e.g. sac.balance=['critic'], as the famo presets do)"
                )
            balancers[name] = b
        self.balancers = nn.ModuleDict(balancers)
        #: Balanced updates, per loss, whose balancer solve fell back to a documented choice
        #: (``balancer.info["fallback"]``: a degenerate Gramian, 0 in the gradients' hull,
        #: ...); logged as ``<loss>/fallback_updates``, saved by the trainer's checkpoints.
        self.fallback_updates: dict[str, int] = dict.fromkeys(self.balancers, 0)

        #: Whether the NaN/Inf guard masks steps on the device instead of reading a flag.
        self.masked_guard = _masked_guard(cfg.nan_guard, self.device)
        # Masked steps restore Adam's step counts with torch.where, so those must live on
        # the parameters' device: capturable Adam (on the CPU they are there anyway).
        adam = functools.partial(
            torch.optim.Adam, capturable=self.masked_guard and self.device.type != "cpu"
        )
        self.actor_optimizer = adam(self.actor.parameters(), lr=cfg.actor_lr)
        self.critic_optimizer = adam(self.critic.parameters(), lr=cfg.critic_lr)
        self.alpha_optimizer = adam([self.log_alpha], lr=cfg.alpha_lr)
        self._balancer_snapshots: dict[str, dict[str, Tensor]] = {}  # see update()
        #: Compute the gradient statistics (mean cosine, conflicts, norms) of balanced
        #: losses. They cost a K×K Gramian (K² D FLOPs, about one backward at K = 50);
        #: a trainer may set this False on updates whose metrics it does not log.
        self.diagnostics = True

    # ------------------------------------------------------------------ acting
    def temperatures(self) -> Tensor:
        """The K temperatures ``α_k`` (detached)."""
        return self.log_alpha.detach().exp().expand(self.num_tasks)

    def task_ids_from_obs(self, obs: Tensor) -> Tensor:
        """Task ids as the argmax of the trailing one-hot of ``obs`` (N, obs_dim)."""
        return obs[..., -self.num_tasks :].argmax(-1)

    @torch.no_grad()
    def act(self, obs: Tensor, deterministic: bool = False) -> Tensor:
        """Actions in ``[-1, 1]`` for observations ``(N, obs_dim)`` (or one ``(obs_dim,)``).

        ``deterministic`` gives ``tanh(μ)``; otherwise a sample of the policy.
        """
        single = obs.ndim == 1
        obs = obs.to(self.device, torch.float32)
        if single:
            obs = obs.unsqueeze(0)
        if obs.ndim != 2 or obs.shape[1] != self.obs_dim:
            raise ValueError(f"obs must be (N, {self.obs_dim}), got {tuple(obs.shape)}")
        task_id = self.task_ids_from_obs(obs) if self.actor.num_heads > 1 else None
        if deterministic:  # no sample drawn: evaluation leaves every RNG as it was
            out = torch.tanh(self.actor.distribution_params(obs, task_id)[0])
        else:
            out = self.actor(obs, task_id)[0]
        return out[0] if single else out

    # ------------------------------------------------------------------ per-sample terms
    # Each returns the per-sample loss terms of a block (n,); a TaskLossFn is their mean.
    def _critic_terms(self, params, obs, action, task_id, target) -> Tensor:
        q = functional_call(self.critic, params, (obs, action, task_id))  # (2, n)
        return (q - target).pow(2).sum(0)

    def _actor_terms(self, params, obs, task_id, eps, alpha, *, critic_params) -> Tensor:
        action, log_prob, _ = functional_call(self.actor, params, (obs, task_id, eps))
        q = functional_call(self.critic, critic_params, (obs, action, task_id)).min(0).values
        return alpha * log_prob - q

    def _alpha_terms(self, params, task_id, log_prob_plus_target) -> Tensor:
        log_alpha = params["log_alpha"].expand(self.num_tasks)[task_id]
        return -log_alpha * log_prob_plus_target

    def _fallback_metric(self, name: str) -> Tensor:
        """The count as a CPU tensor (host numbers: no device copy in the update)."""
        return torch.tensor(float(self.fallback_updates[name]))

    # ------------------------------------------------------------------ update
    def update(self, batch: Any) -> dict[str, Tensor]:
        """One SAC update on ``batch`` (a :class:`mtrl.buffers.Batch`).

        Critic step, then actor step, then temperature step, then the Polyak update of
        the target critic. Returns tensor metrics (nothing copied to the host):
        ``{critic,actor,alpha}/losses`` (K,), ``{critic,actor,alpha}/grad_norm`` (),
        ``alpha/temperature`` (K,), ``actor/entropy`` (K,) (``-log π`` per task), for
        each balanced loss ``<loss>/weights`` (K,), ``<loss>/grad_norms`` (K,),
        ``<loss>/mean_cosine`` (), ``<loss>/conflict_fraction`` (),
        ``<loss>/fallback_updates`` () (a CPU count, see :attr:`fallback_updates`), and
        ``skipped`` ().
        """
        K, dev = self.num_tasks, self.device
        obs, action = batch.obs.to(dev), batch.action.to(dev)
        next_obs, task_id = batch.next_obs.to(dev), batch.task_id.to(dev).long()
        B = obs.shape[0]
        reward = batch.reward.to(dev).reshape(B).to(obs.dtype)
        done = batch.done.to(dev).reshape(B).to(obs.dtype)
        task_major = self._check_layout(task_id, getattr(batch, "task_major", None))

        metrics: dict[str, Tensor] = {}
        # Balancer state before each balanced backward: a skipped step puts it back (a
        # sampler's generator, a cache), like the parameters and Adam's state.
        self._balancer_snapshots = {}
        nan_k = torch.full((K,), float("nan"), device=dev)
        nan_0 = torch.full((), float("nan"), device=dev)
        for name in LOSS_NAMES:
            metrics[f"{name}/losses"], metrics[f"{name}/grad_norm"] = nan_k, nan_0
        metrics["actor/entropy"] = nan_k
        for name in self.balancers:
            metrics.update(_stats_metrics(name, None, nan_k, nan_0))
            metrics[f"{name}/fallback_updates"] = self._fallback_metric(name)

        eps_next = torch.randn(B, self.act_dim, device=dev, dtype=obs.dtype)
        eps = torch.randn(B, self.act_dim, device=dev, dtype=obs.dtype)
        with torch.no_grad():
            alpha = self.log_alpha.exp().expand(K)[task_id]
            next_action, next_log_prob, _ = self.actor(next_obs, task_id, eps_next)
            q_next = self.critic_target(next_obs, next_action, task_id).min(0).values
            target = reward + self.cfg.gamma * (1.0 - done) * (q_next - alpha * next_log_prob)

        # ---- critic
        c_params = dict(self.critic.named_parameters())
        c_data = (obs, action, task_id, target)
        c_check, c_norm = self._backward(
            "critic", self._critic_terms, c_params, c_data, task_id, task_major, metrics
        )
        ok_critic = _finite(c_check, c_norm)
        if self.masked_guard:  # no host read: the step is undone on the device if not ok
            self._step("critic", self.critic_optimizer, self._critic_terms, c_params, c_data,
                       c_norm, ok_critic)
        elif not bool(ok_critic):  # host sync 1 of 2
            return self._skip(metrics, c_params.values())
        else:
            self._step("critic", self.critic_optimizer, self._critic_terms, c_params, c_data,
                       c_norm)

        # ---- actor, then temperature (both guarded by one check, then both stepped)
        a_params = dict(self.actor.named_parameters())
        critic_consts = {k: v.detach() for k, v in c_params.items()}
        a_terms = functools.partial(self._actor_terms, critic_params=critic_consts)
        a_data = (obs, task_id, eps, alpha)
        a_check, a_norm = self._backward(
            "actor", a_terms, a_params, a_data, task_id, task_major, metrics
        )
        with torch.no_grad():  # log π of the same samples, before the actor step
            _, log_prob, _ = self.actor(obs, task_id, eps)
        metrics["actor/entropy"] = -self._per_task(log_prob, task_id, task_major)
        t_params = {"log_alpha": self.log_alpha}
        t_data = (task_id, log_prob + self.target_entropy)
        t_check, t_norm = self._backward(
            "alpha", self._alpha_terms, t_params, t_data, task_id, task_major, metrics
        )
        ok = _finite(a_check, a_norm) & _finite(t_check, t_norm)
        if self.masked_guard:
            ok = ok & ok_critic  # as with "sync": a failed critic step skips everything
        elif not bool(ok):  # host sync 2 of 2
            return self._skip(metrics, [*a_params.values(), self.log_alpha])
        mask = ok if self.masked_guard else None
        self._step("actor", self.actor_optimizer, a_terms, a_params, a_data, a_norm, mask)
        self._step("alpha", self.alpha_optimizer, self._alpha_terms, t_params, t_data, t_norm,
                   mask)

        if mask is not None and self._balancer_snapshots:
            # masked: the balancers of undone steps go back too. This reads both flags in
            # one host sync, only for balancers that keep state, which sync anyway when
            # their K×K problem is solved on the CPU.
            critic_ok, rest_ok = torch.stack((ok_critic, ok)).tolist()
            flags = {"critic": critic_ok, "actor": rest_ok, "alpha": rest_ok}
            for name, state in self._balancer_snapshots.items():
                if not flags[name]:
                    self.balancers[name].load_state_dict(state)
            self._balancer_snapshots = {}

        # ---- target critic (not moved when the update was skipped)
        target, online = list(self.critic_target.parameters()), list(self.critic.parameters())
        with torch.no_grad():
            if mask is None:
                torch._foreach_lerp_(target, online, self.cfg.tau)
            else:  # weight 0 leaves the target exactly as it was
                tau = self.cfg.tau * mask.to(target[0].dtype)
                for t, o in zip(target, online, strict=True):
                    t.lerp_(o, tau)
        metrics["alpha/temperature"] = self.temperatures().clone()
        metrics["skipped"] = (~ok).float() if mask is not None else torch.zeros((), device=dev)
        return metrics

    def _check_layout(self, task_id: Tensor, declared: bool | None) -> bool:
        """Whether the batch is task-major (block k = task k): as ``declared`` by the
        buffer (its ``Batch.task_major``), else checked on this batch (a host read)."""
        B, K = task_id.shape[0], self.num_tasks
        if B == 0:
            raise ValueError("update() got an empty batch")
        if B % K:
            task_major = False
        elif declared is not None:
            task_major = bool(declared)
        else:
            expected = torch.arange(K, device=task_id.device).unsqueeze(1)
            task_major = bool((task_id.view(K, B // K) == expected).all())
        if not task_major and self.balancers:
            raise ValueError(
                f"balancing the {', '.join(self.balancers)} loss(es) needs stratified, task-major "
                f"batches (B divisible by K={K}, block k of x.view(K, B // K, ...) all task k); "
                f"got a batch of {B} that is not. Sample stratified batches, or set "
                f"sac.balance=[] to train on the plain batch mean."
            )
        return task_major

    def _per_task(self, values: Tensor, task_id: Tensor, task_major: bool) -> Tensor:
        """Per-task means of per-sample ``values`` (B,) -> (K,); NaN for absent tasks."""
        K = self.num_tasks
        if task_major:
            return values.view(K, -1).mean(1)
        zeros = values.new_zeros(K)
        sums = zeros.index_add(0, task_id, values)
        counts = zeros.index_add(0, task_id, torch.ones_like(values))  # no sync, unlike bincount
        return sums / counts  # 0/0 = NaN for a task not in the batch

    def _blocks(self, data: Sequence[Tensor]) -> list[Tensor]:
        K = self.num_tasks
        return [x.reshape(K, x.shape[0] // K, *x.shape[1:]) for x in data]

    def _backward(
        self,
        name: str,
        terms_fn: Callable[..., Tensor],
        params: dict[str, nn.Parameter],
        data: Sequence[Tensor],
        task_id: Tensor,
        task_major: bool,
        metrics: dict[str, Tensor],
    ) -> tuple[Tensor, Tensor]:
        """Write the gradients of loss ``name`` into ``.grad``.

        Returns (the losses to check for finiteness, the global gradient norm) and logs
        the per-task losses, the norm and (if balanced) the balancer statistics.
        """
        for p in params.values():
            p.grad = None
        failed = False
        balancer = self.balancers[name] if name in self.balancers else None
        if balancer is None:
            # The plain mean over tasks. Task-major blocks have equal sizes, so that is the
            # batch mean of the per-sample terms: one ordinary batched forward and backward
            # (no vmap, ~10% faster), and the task losses are the block means of the same
            # terms. For a uniform batch it is the batch mean; per-task means are logged.
            terms = terms_fn(params, *data)
            mean = terms.mean()
            mean.backward()
            checked = mean.detach()
            metrics[f"{name}/losses"] = self._per_task(terms.detach(), task_id, task_major)
        else:  # task-major here (see _check_layout)
            state = balancer.state_dict()
            if state:  # stateless balancers (cagrad, mgda, ...) need no snapshot
                self._balancer_snapshots[name] = {k: v.clone() for k, v in state.items()}
            # (weights_for clears it; a balancer with its own combine_rows may not call it)
            balancer.info.pop("fallback", None)
            try:
                stats = balanced_backward_terms(
                    terms_fn, params, data, self.num_tasks, balancer,
                    diagnostics=self.diagnostics,
                )  # fmt: skip
            except (ArithmeticError, ValueError, RuntimeError):
                # A balancer may refuse NaN/Inf input. If that is what happened, report
                # the non-finite losses so that the step is skipped; otherwise re-raise.
                losses = self._nonfinite_losses(mean_of_terms(terms_fn), params, self._blocks(data))
                if losses is None:
                    raise
                failed = True
            else:
                losses = stats.losses.detach()
                metrics.update(_stats_metrics(name, stats, None, None))
                note = balancer.info.get("fallback")
                if note:
                    if not self.fallback_updates[name]:
                        warnings.warn(
                            f"the {name} loss's balancer ({balancer.name}) fell back: {note}. "
                            f"Later fallbacks are counted in the metric {name}/fallback_updates",
                            stacklevel=3,
                        )
                    self.fallback_updates[name] += 1
                    metrics[f"{name}/fallback_updates"] = self._fallback_metric(name)
            metrics[f"{name}/losses"] = checked = losses
        if failed:
            norm = torch.full((), float("nan"), device=self.device)
        else:
            norm = get_total_norm([p.grad for p in params.values() if p.grad is not None])
        metrics[f"{name}/grad_norm"] = norm
        return checked, norm

    def _nonfinite_losses(
        self, loss_fn: Callable[..., Tensor], params: dict[str, nn.Parameter], blocks: list[Tensor]
    ) -> Tensor | None:
        """After a balancer raised: the task losses if they or their gradients are non-finite.

        Returns ``None`` when everything is finite (the error was not caused by NaN/Inf).
        Only runs on the error path, so its cost does not matter.
        """
        for p in params.values():
            p.grad = None
        losses, grads = task_gradients(loss_fn, params, blocks)
        if bool(torch.isfinite(losses).all() & torch.isfinite(grads).all()):
            return None
        return losses

    def _step(
        self,
        name: str,
        optimizer: torch.optim.Optimizer,
        terms_fn: Callable[..., Tensor],
        params: dict[str, nn.Parameter],
        data: Sequence[Tensor],
        norm: Tensor,
        ok: Tensor | None = None,
    ) -> None:
        """Clip (optional), step, and feed the balancer the losses after the step if it asks.

        With ``ok`` (a device bool, masked guard) the step is undone on the device when
        ``ok`` is false. A balancer that wants the losses after the step gets them as a
        float64 CPU tensor, copied to the host in one copy together with ``ok``, and is not
        called on a skip.
        """
        if self.cfg.grad_clip is not None:
            clip_grads_with_norm_(list(params.values()), self.cfg.grad_clip, norm)
        if ok is None:
            optimizer.step()
        else:
            _masked_step(optimizer, ok)
        if ok is None:
            self._balancer_snapshots.pop(name, None)  # this step stands
        balancer = self.balancers[name] if name in self.balancers else None
        if balancer is not None and balancer.needs_losses_after_step:
            with torch.no_grad():
                terms_after = terms_fn(params, *data)
                losses_after = terms_after.view(self.num_tasks, -1).mean(1).double()
                if ok is not None:  # the flag travels with the losses: one host copy
                    losses_after = torch.cat((losses_after, ok.double().reshape(1)))
                losses_after = losses_after.cpu()
            if ok is not None:
                stepped, losses_after = bool(losses_after[-1]), losses_after[:-1]
                if not stepped:  # undone on the device: nothing to feed the balancer
                    return
            # a step that made the losses non-finite (a diverging learning rate, say) is
            # not fed to the balancer; the next update's guard catches the divergence
            if bool(torch.isfinite(losses_after).all()):
                balancer.after_step(losses_after)

    def _skip(self, metrics: dict[str, Tensor], params: Any) -> dict[str, Tensor]:
        for p in params:
            p.grad = None
        for name, state in self._balancer_snapshots.items():  # the losses not stepped
            self.balancers[name].load_state_dict(state)
        self._balancer_snapshots = {}
        metrics["alpha/temperature"] = self.temperatures().clone()
        metrics["skipped"] = torch.ones((), device=self.device)
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def optimizer_state_dict(self) -> dict[str, Any]:
        """State of the three optimisers (save it next to ``state_dict()``)."""
        return {
            "actor": self.actor_optimizer.state_dict(),
            "critic": self.critic_optimizer.state_dict(),
            "alpha": self.alpha_optimizer.state_dict(),
        }

    def load_optimizer_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore what :meth:`optimizer_state_dict` returned."""
        want = {"actor", "critic", "alpha"}
        if not isinstance(sd, dict) or set(sd) != want:
            got = sorted(sd) if isinstance(sd, dict) else type(sd).__name__
            raise ValueError(f"optimizer state must have keys {sorted(want)}, got {got}")
        capturable = self.masked_guard and self.device.type != "cpu"
        for opt, key in ((self.actor_optimizer, "actor"), (self.critic_optimizer, "critic"),
                         (self.alpha_optimizer, "alpha")):
            opt.load_state_dict(sd[key])
            # The state may come from another device (a CUDA run resumed on the CPU, or the
            # reverse): Adam's `capturable` is this agent's choice, not the saved one, and
            # its step counts go where that choice wants them.
            for group in opt.param_groups:
                group["capturable"] = capturable
                for p in group["params"]:
                    state = opt.state.get(p, {})
                    step = state.get("step")
                    if isinstance(step, Tensor):
                        where = p.device if capturable else torch.device("cpu")
                        state["step"] = step.detach().to(where, torch.float32)


def _finite(losses: Tensor, norm: Tensor) -> Tensor:
    return torch.isfinite(losses).all() & torch.isfinite(norm)


def _masked_guard(mode: str, device: torch.device) -> bool:
    """Resolve ``SACConfig.nan_guard`` for ``device`` (True: masked steps)."""
    supported = getattr(torch_optimizer, "_get_capturable_supported_devices", None)
    capturable = device.type in (supported() if supported else ("cuda",))
    if mode == "masked" and not (capturable or device.type == "cpu"):
        raise ValueError(
            f"nan_guard='masked' needs Adam's step counts on the device, which torch's "
            f"capturable Adam does not support on {device.type!r}; use nan_guard='sync'"
        )
    if mode == "auto":
        return capturable
    return mode == "masked"


def _masked_step(optimizer: torch.optim.Optimizer, ok: Tensor) -> None:
    """``optimizer.step()``, then put back the parameters and the optimiser state where
    ``ok`` (a device bool) is false: ``torch.where`` on the device, no host read.

    State created by this step (the first step of a parameter) is put back as zeros,
    which for Adam (zero moments, step 0) continues exactly as a fresh state would.
    """
    saved = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue  # not stepped
            state = optimizer.state.get(p) or {}
            old = {k: v.clone() for k, v in state.items() if isinstance(v, Tensor)}
            saved.append((p, p.detach().clone(), old))
    optimizer.step()
    with torch.no_grad():
        for p, p_old, old in saved:
            p.copy_(torch.where(ok, p, p_old))
            for key, value in optimizer.state[p].items():
                if isinstance(value, Tensor):
                    before = old.get(key)
                    if before is None:
                        before = torch.zeros_like(value)
                    value.copy_(torch.where(ok.to(value.device), value, before))


def _stats_metrics(
    name: str, stats: BalanceStats | None, nan_k: Tensor | None, nan_0: Tensor | None
) -> dict[str, Tensor]:
    if stats is None:
        return {
            f"{name}/weights": nan_k,
            f"{name}/grad_norms": nan_k,
            f"{name}/mean_cosine": nan_0,
            f"{name}/conflict_fraction": nan_0,
        }
    return {
        f"{name}/weights": stats.weights.detach(),
        f"{name}/grad_norms": stats.grad_norms.detach(),
        f"{name}/mean_cosine": stats.mean_cosine.detach(),
        f"{name}/conflict_fraction": stats.conflict_fraction.detach(),
    }
