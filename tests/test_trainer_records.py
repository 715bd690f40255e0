"""What a training run records, checked against numbers known independently of the
trainer: per-task replay capacity and transitions, training returns per log window,
env-step counts, throughput and wall-clock under a controlled clock (also across a
resume), skipped-update totals across a resume, the resume of environments that cannot
be checkpointed, the default run directory, and errors that must not be swallowed."""

import json
import types
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_trainer import NaNRewardAfter, _jsonl, toy_config

import mtrl.trainer
from mtrl.checkpoint import load_checkpoint
from mtrl.envs import EnvConfig, make_envs
from mtrl.trainer import default_run_dir, train

# These runs mostly collect warm-up data on purpose; the warning about it is asserted in
# test_a_run_exactly_as_long_as_its_warmup_is_warned.
pytestmark = pytest.mark.filterwarnings(
    "ignore:total_steps .* the step after which updates start:UserWarning"
)

K = 4  # the toy env's task count


class RecordingEnv:
    """The toy env, recording every step's output; task 0's episode is reported as ended
    (truncated) at step ``end_task0_at`` as well, so tasks end episodes at different
    steps (the toy env itself is not reset: only the trainer's statistics see it)."""

    def __init__(self, cfg, end_task0_at: int):
        self.env = make_envs(cfg)
        self.end_task0_at, self.t, self.steps = end_task0_at, 0, []

    def __getattr__(self, name):
        return getattr(self.env, name)

    def step(self, action):
        out = self.env.step(action)
        self.t += 1
        if self.t == self.end_task0_at:
            truncated = out.truncated.clone()
            truncated[0] = True
            out = out._replace(truncated=truncated)
        self.steps.append(out)
        return out


@pytest.fixture(scope="module")
def records_run(tmp_path_factory):
    """40 warm-up steps (no updates) of 20-step episodes, logs every 10 steps, task 0 also
    ending an episode at step 5; returns (run dir, recorded steps, warnings)."""
    tmp = tmp_path_factory.mktemp("records")
    cfg = toy_config(tmp, total_steps=40, warmup_steps=40, log_every=10,
                     checkpoint_every=1000, buffer_capacity=4000)
    made = []

    def factory(c):
        made.append(RecordingEnv(c, end_task0_at=5) if not made else make_envs(c))
        return made[-1]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg, env_factory=factory)
    return Path(cfg.run_dir), made[0].steps, [str(w.message) for w in caught]


def test_replay_capacity_is_split_evenly_between_tasks(records_run):
    """buffer_capacity 4000 over the 4 toy tasks: 1000 transitions per task."""
    run, _, _ = records_run
    buffer = load_checkpoint(run / "checkpoint.pt")["buffer"]
    assert int(buffer["capacity"]) == 4000 // K


def test_replay_stores_the_true_final_observation_and_bootstraps_through_time_limits(
        records_run):
    """At the 20-step time limit the stored next_obs is the final observation (not the
    reset one) and done is 0: only terminations (none here) stop bootstrapping."""
    run, steps, _ = records_run
    buffer = load_checkpoint(run / "checkpoint.pt")["buffer"]
    assert bool(steps[19].truncated.all())  # the time limit: step 20
    final = torch.stack([s.next_obs for s in steps], dim=1)  # (K, 40, obs_dim)
    torch.testing.assert_close(buffer["next_obs"], final, rtol=0, atol=0)
    assert not torch.equal(buffer["next_obs"][:, 19], steps[19].obs)  # reset obs differs
    torch.testing.assert_close(buffer["obs"][:, 20], steps[19].obs, rtol=0, atol=0)
    assert torch.equal(buffer["done"], torch.zeros(K, 40))
    torch.testing.assert_close(buffer["reward"],
                               torch.stack([s.reward for s in steps], dim=1), rtol=0, atol=0)


def test_train_return_is_the_mean_finished_episode_return_over_tasks_that_ended_one(
        records_run):
    """train_return of a window averages the returns of the episodes finished in it over
    the tasks that finished one (task 0 alone at step 5; its next episode is steps
    6..20); an episode's return starts at 0 after the previous one ended."""
    run, steps, _ = records_run
    r = torch.stack([s.reward for s in steps]).double()  # (40, K)
    logs = {m["step"]: m for m in _jsonl(run / "metrics.jsonl")}
    assert logs[10]["train_tasks_ended"] == 1 and logs[10]["train_episodes"] == 1
    assert logs[10]["train_return"] == pytest.approx(float(r[:5, 0].sum()), rel=1e-5)
    at_20 = [float(r[5:20, 0].sum())] + [float(r[:20, k].sum()) for k in range(1, K)]
    assert logs[20]["train_tasks_ended"] == K and logs[20]["train_episodes"] == K
    assert logs[20]["train_return"] == pytest.approx(sum(at_20) / K, rel=1e-5)
    assert logs[30]["train_return"] is None and logs[30]["train_episodes"] == 0
    at_40 = [float(r[20:40, k].sum()) for k in range(K)]
    assert logs[40]["train_return"] == pytest.approx(sum(at_40) / K, rel=1e-5)


def test_env_steps_count_every_task_in_evaluations_and_results(records_run):
    """env_steps = vector steps x K in eval.jsonl, result.json and metrics.jsonl."""
    run, _, _ = records_run
    evals = _jsonl(run / "eval.jsonl")
    assert [(e["step"], e["env_steps"]) for e in evals] == [(40, 40 * K)]
    result = json.loads((run / "result.json").read_text())
    assert (result["step"], result["env_steps"]) == (40, 40 * K)
    assert [m["env_steps"] for m in _jsonl(run / "metrics.jsonl")] == [10 * K, 20 * K,
                                                                         30 * K, 40 * K]


def test_a_run_exactly_as_long_as_its_warmup_is_warned(records_run):
    """total_steps == warmup_steps makes no update: warned like a shorter run."""
    _, _, caught = records_run
    assert any("total_steps 40 <= 40" in m and "no gradient update" in m for m in caught)


def test_the_replay_sampler_is_seeded_with_the_run_seed(records_run):
    """The buffer's sampling generator starts from the run's seed (3), untouched by a run
    that made no update."""
    run, _, _ = records_run
    buffer = load_checkpoint(run / "checkpoint.pt")["buffer"]
    assert torch.equal(buffer["generator"], torch.Generator().manual_seed(3).get_state())


def test_default_run_dir_names_benchmark_balancer_and_seed(tmp_path):
    """README: runs/<benchmark>-<balancer>-s<seed>."""
    cfg = replace(toy_config(tmp_path), balancer="cagrad",
                  env=EnvConfig(benchmark="MT10", seed=7))
    assert default_run_dir(cfg) == Path("runs") / "mt10-cagrad-s7"


# ---------------------------------------------------------------- loss scalars

def test_logged_loss_scalars_are_the_task_mean_of_the_per_task_losses(tmp_path):
    """critic/loss, actor/loss and alpha/loss are the means of their per-task lists."""
    cfg = toy_config(tmp_path, total_steps=10, warmup_steps=6, log_every=10,
                     checkpoint_every=1000)
    train(cfg)
    last = _jsonl(tmp_path / "run" / "metrics.jsonl")[-1]
    for name in ("critic", "actor", "alpha"):
        losses = last[f"{name}/losses"]
        assert len(losses) == K
        mean = sum(losses) / K
        assert last[f"{name}/loss"] == pytest.approx(mean, rel=1e-6, abs=1e-5), name
    spread = last["critic/losses"]
    assert max(spread) - min(spread) > 1e-3  # (the tasks' losses do differ)


# ---------------------------------------------------------------- a controlled clock

class ClockedEnv:
    """The toy env without ``state_dict`` (like Meta-World's): each step advances
    ``clock`` by one second; records its reset seeds; raises at step ``fail_at``."""

    def __init__(self, cfg, clock: list, fail_at: int | None = None):
        self.env = make_envs(cfg)
        self.clock, self.fail_at, self.t, self.reset_seeds = clock, fail_at, 0, []

    def __getattr__(self, name):
        if name in ("state_dict", "load_state_dict"):
            raise AttributeError(name)
        return getattr(self.env, name)

    def reset(self, seed=None):
        self.reset_seeds.append(seed)
        return self.env.reset(seed=seed)

    def step(self, action):
        if self.t == self.fail_at:
            raise RuntimeError("killed")
        self.t += 1
        self.clock[0] += 1.0
        return self.env.step(action)


def _session(cfg, resume: bool, fail_at: int | None = None):
    """One session on a fresh clock (0 s at its start) that only the training env's steps
    advance: evaluations and checkpoints take no time. Returns (env, warnings)."""
    clock = [0.0]
    made = []

    def factory(c):
        made.append(ClockedEnv(c, clock, fail_at) if not made else make_envs(c))
        return made[-1]

    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mp.setattr(mtrl.trainer, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
        try:
            train(cfg, resume=resume, env_factory=factory)
        except RuntimeError as exc:
            assert str(exc) == "killed"
    return made[0], [str(w.message) for w in caught]


@pytest.fixture(scope="module")
def clocked_resume(tmp_path_factory):
    """10-step episodes, logs every 20, a checkpoint at 30; session 1 dies at step 36,
    session 2 resumes from 30 and ends at 60. One step = one clock second."""
    tmp = tmp_path_factory.mktemp("clocked")
    cfg = toy_config(tmp, env=EnvConfig(benchmark="toy", max_episode_steps=10, seed=3),
                     total_steps=60, warmup_steps=100, log_every=20, checkpoint_every=30)
    first, _ = _session(cfg, resume=False, fail_at=35)
    assert first.t == 35
    ckpt = load_checkpoint(Path(cfg.run_dir) / "checkpoint.pt")
    second, caught = _session(cfg, resume=True)
    return Path(cfg.run_dir), ckpt, second, caught


def test_window_throughput_is_the_windows_env_steps_per_second(clocked_resume):
    """env_steps_per_s of every window, before and after the resume: K env-steps per
    clock second (each window's own steps over its own time)."""
    run, _, _, _ = clocked_resume
    logs = _jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in logs] == [20, 40, 60]
    assert [m["env_steps_per_s"] for m in logs] == [float(K)] * 3


def test_wall_clock_and_rate_cover_every_session(clocked_resume):
    """result.json: 30 s before the checkpoint + 30 s after the resume = 60 s (the lost 5
    s after the checkpoint do not count), 60 * K env-steps over them; the final
    checkpoint holds the whole run's 60 s too."""
    run, ckpt, _, _ = clocked_resume
    assert ckpt["step"] == 30 and ckpt["wall_clock_s"] == 30.0
    result = json.loads((run / "result.json").read_text())
    assert result["resumed_from_step"] == 30
    assert result["wall_clock_s"] == 60.0
    assert result["env_steps_per_s"] == pytest.approx(float(K))
    assert load_checkpoint(run / "checkpoint.pt")["wall_clock_s"] == 60.0


def test_resuming_envs_without_state_starts_new_seeded_episodes(clocked_resume):
    """An env without state_dict: the resume warns, resets with seed + checkpoint step
    (3 + 30), and keeps the log window's finished episodes (4 at step 30) beside the new
    ones (4 at step 40)."""
    run, ckpt, second, caught = clocked_resume
    assert "env" not in ckpt
    assert any("these environments cannot be checkpointed" in m for m in caught)
    assert second.reset_seeds[-1] == 3 + 30 and second.reset_seeds[-1] != 3
    at_40 = {m["step"]: m for m in _jsonl(run / "metrics.jsonl")}[40]
    assert at_40["train_episodes"] == 2 * K and at_40["train_tasks_ended"] == K


# ---------------------------------------------------------------- skips and errors

def test_skipped_update_totals_carry_over_a_resume(tmp_path):
    """Every update is skipped (NaN rewards from the first step): 6 in the first session
    (steps 9-14), 4 after the resume (15-18); result.json counts all 10."""
    cfg = toy_config(tmp_path, total_steps=14, warmup_steps=8, log_every=7,
                     checkpoint_every=1000, max_consecutive_skips=1000)
    first = train(cfg, env_factory=lambda c: NaNRewardAfter(c, start=1))
    assert first.skipped_updates == 6
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["skipped_total"] == 6
    done = train(replace(cfg, total_steps=18), resume=True,
                 env_factory=lambda c: NaNRewardAfter(c, start=1))
    assert done.skipped_updates == 10
    assert json.loads((tmp_path / "run" / "result.json").read_text())["skipped_updates"] == 10


def test_an_evaluation_error_is_raised_not_swallowed(tmp_path, monkeypatch):
    """An evaluation that fails (no stop signal, not out of memory) stops the run with
    its error: no later step runs and no result.json is written."""
    real_evaluate, calls = mtrl.trainer.evaluate, []

    def fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("evaluation broke")
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(mtrl.trainer, "evaluate", fails_once)
    cfg = toy_config(tmp_path, total_steps=4, warmup_steps=4, eval_every=2,
                     checkpoint_every=1000)
    with pytest.raises(ValueError, match="evaluation broke"):
        train(cfg)
    assert len(calls) == 1
    assert not (tmp_path / "run" / "result.json").exists()
