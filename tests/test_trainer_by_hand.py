"""Training loop on the toy environment, checked against numbers derived by hand: warm-up
actions (and their resume), updates per step, training-episode success, and the
evaluation settings and records."""

from dataclasses import replace

import pytest
import torch
from test_trainer import _jsonl, toy_config

from mtrl.checkpoint import load_checkpoint
from mtrl.envs import eval_seed, make_envs
from mtrl.trainer import train

pytestmark = pytest.mark.filterwarnings(
    "ignore:total_steps .* the step after which updates start:UserWarning"
)


def warmup_actions_by_hand(seed: int, steps: int, num_tasks: int = 4) -> torch.Tensor:
    """(K, steps, 2): warm-up step s acts -1 + 2u with u the s-th (K, 2) draw of a
    generator seeded ``env.seed + 1`` (the toy env's actions are in [-1, 1])."""
    gen = torch.Generator().manual_seed(seed + 1)
    draws = [torch.rand(num_tasks, 2, generator=gen) for _ in range(steps)]
    return torch.stack([-1 + u * 2 for u in draws], dim=1)


def test_warmup_acts_at_random_up_to_and_including_the_warmup_step(tmp_path):
    """warmup_steps=5: steps 1..5 take uniform random actions (stored in the buffer in step
    order), step 6 the policy's. Step 5 must still be a random draw."""
    cfg = toy_config(tmp_path, total_steps=6, warmup_steps=5, checkpoint_every=1000)
    train(cfg)
    stored = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["buffer"]["action"]
    assert stored.shape == (4, 6, 2)
    torch.testing.assert_close(stored[:, :5], warmup_actions_by_hand(3, 5), rtol=0, atol=0)
    # step 6: the policy acted, not the generator's sixth draw
    assert not torch.equal(stored[:, 5], warmup_actions_by_hand(3, 6)[:, 5])


def test_a_resume_inside_the_warmup_continues_the_random_action_draws(tmp_path):
    """Split at step 4 of a 10-step warm-up: the resumed steps 5..10 must take the 5th..10th
    draws of the warm-up generator (restored from the checkpoint), not start its sequence
    again, so the buffer holds the same actions as an uninterrupted run: those by hand."""
    cfg = toy_config(tmp_path, total_steps=4, warmup_steps=10, checkpoint_every=1000)
    train(cfg)
    train(replace(cfg, total_steps=10), resume=True)
    stored = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["buffer"]["action"]
    torch.testing.assert_close(stored, warmup_actions_by_hand(3, 10), rtol=0, atol=0)


def test_updates_per_step_updates_that_many_times_per_step(tmp_path):
    """Warm-up 5, total 8, 3 updates per step: steps 6, 7 and 8 update, 3 times each, so
    every Adam state has taken 3 · 3 = 9 steps (one update is one step of each optimiser)."""
    cfg = toy_config(tmp_path, total_steps=8, warmup_steps=5, updates_per_step=3,
                     checkpoint_every=1000)
    train(cfg)
    optim = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["optim"]
    for name in ("actor", "critic", "alpha"):
        steps = {float(s["step"]) for s in optim[name]["state"].values()}
        assert steps == {9.0}, (name, steps)


class ScriptedSuccess:
    """The toy env, with ``success`` replaced: True for every task on the steps listed
    (counted from 1 over the env's life), False otherwise. Records its reset seeds."""

    def __init__(self, cfg, success_steps=(), per_reset=None):
        self.env = make_envs(cfg)
        self.success_steps, self.per_reset = set(success_steps), per_reset
        self.t, self.resets, self.reset_seeds = 0, 0, []

    def __getattr__(self, name):
        return getattr(self.env, name)

    def reset(self, seed=None):
        self.resets += 1
        self.reset_seeds.append(seed)
        return self.env.reset(seed=seed)

    def step(self, action):
        out = self.env.step(action)
        self.t += 1
        if self.per_reset is not None:  # success pattern of the current evaluation
            success = torch.tensor(self.per_reset[self.resets - 1])
        else:
            success = torch.full((self.env.num_tasks,), self.t in self.success_steps)
        return out._replace(success=success)


def test_training_success_is_reset_when_an_episode_ends(tmp_path):
    """20-step episodes, logs every 20 steps. Every task succeeds at step 3 only, in its
    first episode: the first window's episodes succeeded (1.0), the second window's did
    not (0.0); a success flag carried over the episode boundary would give 1.0 twice."""
    cfg = toy_config(tmp_path, total_steps=40, warmup_steps=40, log_every=20,
                     checkpoint_every=1000)
    train(cfg, env_factory=lambda c: ScriptedSuccess(c, success_steps=(3,)))
    logs = {m["step"]: m for m in _jsonl(tmp_path / "run" / "metrics.jsonl")}
    assert logs[20]["train_episodes"] == 4 and logs[20]["train_success"] == 1.0
    assert logs[40]["train_episodes"] == 4 and logs[40]["train_success"] == 0.0


def test_evaluations_honour_eval_episodes_and_keep_the_best_success(tmp_path):
    """Evaluations at steps 5, 10, 15 on an env whose tasks succeed as scripted per
    evaluation: two of four (0.5), none (0.0), all four (1.0). best_success is the running
    maximum 0.5, 0.5, 1.0 (neither a constant nor the first value). eval_episodes=3 (the
    mtrl protocol's default is 1): 3 episodes of 4 steps per task, so each evaluation
    takes 12 steps. Each evaluation resets with eval_seed(seed, step)."""
    cfg = toy_config(tmp_path, total_steps=15, warmup_steps=15, eval_every=5, eval_episodes=3,
                     checkpoint_every=1000)
    made = []

    def factory(c):
        if not made:  # the training env
            made.append(make_envs(c))
        else:  # the evaluation env: 4-step episodes
            made.append(ScriptedSuccess(replace(c, max_episode_steps=4), per_reset=[
                [True, False, True, False], [False] * 4, [True] * 4]))
        return made[-1]

    result = train(cfg, env_factory=factory)
    evals = _jsonl(tmp_path / "run" / "eval.jsonl")
    assert [e["step"] for e in evals] == [5, 10, 15]
    assert [e["mean_success"] for e in evals] == [0.5, 0.0, 1.0]
    assert [e["best_success"] for e in evals] == [0.5, 0.5, 1.0]
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["best_success"] == 1.0
    assert result.final_eval["best_success"] == 1.0
    assert [e["episodes_per_task"] for e in evals] == [3, 3, 3]
    eval_env = made[1]
    assert eval_env.t == 3 * 12  # three evaluations of 3 episodes of 4 steps
    assert eval_env.reset_seeds == [eval_seed(3, s) for s in (5, 10, 15)]
