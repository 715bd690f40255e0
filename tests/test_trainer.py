"""Training loop on the toy environment: every balancer trains, exact resume, NaN guard,
Ctrl-C, and configuration errors."""

import json
import math
import os
import re
import shutil
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mtrl.agents.sac import SACConfig
from mtrl.balancers import build, names
from mtrl.checkpoint import load_checkpoint
from mtrl.config import ConfigError, TrainConfig, from_dict, load_preset
from mtrl.envs import EnvConfig, make_envs
from mtrl.trainer import TrainingError, _SkipCounter, train

# Many tests here run only warm-up steps on purpose (resume, checkpoint errors); the
# warning about it is asserted in test_a_run_shorter_than_warmup_is_warned and test_cli.
pytestmark = pytest.mark.filterwarnings(
    "ignore:total_steps .* the step after which updates start:UserWarning"
)


@pytest.fixture(autouse=True)
def _hangup_not_ignored():
    """Run under ``nohup`` (or a CI runner that ignores SIGHUP), the process starts with
    SIGHUP ignored, which the trainer rightly keeps: the hangup tests would then fail.
    They test a terminal session, so SIGHUP starts at its default here."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGHUP, previous)


def toy_config(tmp_path, **overrides) -> TrainConfig:
    base = TrainConfig(
        env=EnvConfig(benchmark="toy", max_episode_steps=20, seed=3),
        sac=SACConfig(hidden_sizes=(32, 32)),
        total_steps=120,
        warmup_steps=40,
        batch_size=32,
        buffer_capacity=4000,
        eval_every=0,
        eval_episodes=1,
        log_every=20,
        checkpoint_every=60,
        progress=False,
        run_dir=str(tmp_path / "run"),
        device="cpu",  # the tests expect CPU generators and results; also on a GPU machine
    )
    return replace(base, **overrides)


def flat_params(state: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("balancer", names())
def test_every_balancer_trains_on_toy_env(tmp_path, balancer):
    cfg = toy_config(tmp_path, balancer=balancer, total_steps=90, warmup_steps=30)
    if build(balancer).needs_nonnegative_losses:  # FAMO: critic only, as its presets
        cfg = replace(cfg, sac=replace(cfg.sac, balance=("critic",)))
    # Parameters before training: same seed, same initialisation as inside train().
    torch.manual_seed(cfg.env.seed)
    from mtrl.agents.sac import MultiTaskSAC

    env = make_envs(cfg.env)
    init = MultiTaskSAC(env.obs_dim, env.act_dim, env.num_tasks, cfg.sac,
                        lambda: build(balancer)).state_dict()
    result = train(cfg)
    assert result.steps == 90 and result.skipped_updates == 0
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    last = lines[-1]
    for key in ("critic/loss", "actor/loss", "alpha/loss"):
        assert key in last, f"{key} missing from metrics: {sorted(last)}"
        values = last[key] if isinstance(last[key], list) else [last[key]]
        assert all(torch.isfinite(torch.tensor(values))), (key, values)
    final = load_checkpoint(result.run_dir / "checkpoint.pt")["agent"]
    changed = [k for k, v in flat_params(init).items()
               if v.is_floating_point() and not torch.equal(v, final[k])]
    assert any("actor" in k for k in changed) and any("critic" in k for k in changed)


def _jsonl(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_resume_from_checkpoint_is_exact(tmp_path):
    # evaluations at 30, 60, 90, 120; episodes of 20 steps run across the split at step 50;
    # log window 20 (steps 41-60 straddle the split)
    cfg = toy_config(tmp_path / "a", balancer="cagrad", eval_every=30, checkpoint_every=50)
    full = train(cfg)
    part_cfg = replace(cfg, run_dir=str(tmp_path / "b" / "run"), total_steps=50)
    train(part_cfg)
    resumed = train(replace(part_cfg, total_steps=120), resume=True)
    assert resumed.steps == 120
    a = load_checkpoint(full.run_dir / "checkpoint.pt")
    b = load_checkpoint(resumed.run_dir / "checkpoint.pt")
    for key, value in a["agent"].items():
        assert torch.equal(value, b["agent"][key]), f"{key} differs after resume"
    assert torch.equal(a["buffer"]["obs"], b["buffer"]["obs"])
    # evaluations and training statistics do not depend on the interruption either
    evals_a = {e["step"]: e for e in _jsonl(full.run_dir / "eval.jsonl")}
    evals_b = {e["step"]: e for e in _jsonl(resumed.run_dir / "eval.jsonl")}
    assert evals_a.keys() == {30, 60, 90, 120} and evals_b.keys() == {30, 50, 60, 90, 120}
    for step in (30, 60, 90, 120):
        assert evals_a[step]["return"] == evals_b[step]["return"], step
    assert full.final_eval["return"] == resumed.final_eval["return"]
    # best_success carries over the resume: the running maximum of every evaluation the
    # run made (the step-50 one succeeds where later ones do not, so a restarted maximum
    # shows; it was unchecked until 2026-11-29)
    records = _jsonl(resumed.run_dir / "eval.jsonl")
    assert max(e["mean_success"] for e in records if e["step"] <= 50) > max(
        e["mean_success"] for e in records if e["step"] > 50)
    running = [max(e["mean_success"] for e in records[: i + 1]) for i in range(len(records))]
    assert [e["best_success"] for e in records] == running
    logs_b = {m["step"]: m for m in _jsonl(resumed.run_dir / "metrics.jsonl")}
    for m in _jsonl(full.run_dir / "metrics.jsonl"):
        for key in ("train_return", "train_success", "train_episodes", "critic/losses"):
            assert m.get(key) == logs_b[m["step"]].get(key), (m["step"], key)
    # `mtrl eval` of the final checkpoint repeats the run's final evaluation
    from mtrl.evaluate_run import evaluate_run

    record, _ = evaluate_run(full.run_dir, out_dir=tmp_path / "eval")
    assert record["return"] == full.final_eval["return"]


def test_resume_refuses_other_settings_and_leaves_the_run_intact(tmp_path):
    cfg = toy_config(tmp_path, total_steps=40, checkpoint_every=20)
    train(cfg)
    (tmp_path / "run" / "result.json").unlink()  # as if it had stopped at its checkpoint
    before = (tmp_path / "run" / "config.json").read_text()
    for change in ({"sac": SACConfig(hidden_sizes=(64, 64))}, {"buffer_capacity": 8000},
                   {"balancer": "cagrad"}, {"env": replace(cfg.env, seed=9)}):
        with pytest.raises(ConfigError, match="cannot resume .* with a different configuration: "
                           r"(sac\.hidden_sizes: \[32, 32\] -> \[64, 64\]|buffer_capacity: "
                           r"4000 -> 8000|balancer: \"mean\" -> \"cagrad\"|env\.seed: 3 -> 9)"
                           r"\. Only these may change on resume: total_steps"):
            train(replace(cfg, total_steps=60, **change), resume=True)
        assert (tmp_path / "run" / "config.json").read_text() == before
    # env.device is replaced by the resolved --device when the envs are built: may change
    # (and is said to be ignored)
    with pytest.warns(UserWarning, match="env.device 'cuda' is ignored"):
        done = train(replace(cfg, total_steps=60, log_every=10, threads=1,
                             env=replace(cfg.env, device="cuda")), resume=True)
    assert done.steps == 60 and not done.already_finished
    # the evaluation episodes may change too (the advice after an evaluation ran out of
    # memory was to resume with fewer, and that was refused)
    assert train(replace(cfg, total_steps=80, eval_episodes=2), resume=True).steps == 80


def test_resume_of_a_finished_run_runs_and_writes_nothing(tmp_path):
    cfg = toy_config(tmp_path, total_steps=40, checkpoint_every=20)
    first = train(cfg)
    run = tmp_path / "run"
    files = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    again = train(cfg, resume=True)
    assert again.already_finished and again.steps == 40
    assert again.final_eval == first.final_eval
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == files
    with pytest.raises(ConfigError, match="total_steps 30 is below the checkpoint's step 40"):
        train(replace(cfg, total_steps=30), resume=True)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == files


def test_a_checkpoint_that_does_not_fit_is_a_checkpoint_error(tmp_path):
    from mtrl.checkpoint import CheckpointError

    cfg = toy_config(tmp_path, total_steps=40, checkpoint_every=20)
    train(cfg)
    (tmp_path / "run" / "config.json").unlink()  # no saved config to compare with
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    del state["config"]  # nor in the checkpoint (as from an mtrl before it recorded it)
    torch.save(state, tmp_path / "run" / "checkpoint.pt")
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    # the whole message: load_state_dict names the mismatch after its first line
    with pytest.raises(CheckpointError, match="does not match this run's configuration: "
                       "RuntimeError: Error.s. in loading state_dict for MultiTaskSAC: "
                       "size mismatch for "):
        train(replace(cfg, total_steps=60, sac=SACConfig(hidden_sizes=(64, 64))), resume=True)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before
    assert not (tmp_path / "run" / "config.json").exists()


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    """A checkpoint copied in from another run whose shapes fit was resumed silently: the
    cagrad run went on from the mean run's weights, and Adam at that run's learning rate
    0.01 while config.json said 3e-4."""
    from mtrl.checkpoint import CheckpointError

    ours = toy_config(tmp_path, total_steps=40, checkpoint_every=20, balancer="cagrad")
    other = replace(ours, balancer="mean", sac=replace(ours.sac, actor_lr=0.01),
                    run_dir=str(tmp_path / "other"))
    train(ours)
    train(other)
    run = tmp_path / "run"
    (run / "checkpoint.pt").write_bytes((tmp_path / "other" / "checkpoint.pt").read_bytes())
    files = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    message = (r"checkpoint '.*checkpoint\.pt' was written by a run with other settings "
               r"\(balancer: \"mean\" -> \"cagrad\"; sac\.actor_lr: 0\.01 -> 0\.0003\): "
               "it belongs to another run")
    with pytest.raises(CheckpointError, match=message):
        train(replace(ours, total_steps=60), resume=True)
    (run / "config.json").unlink()  # no config.json: the checkpoint still says whose it is
    del files["config.json"]
    with pytest.raises(CheckpointError, match=message):
        train(replace(ours, total_steps=60), resume=True)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == files
    # settings that may change on resume (total_steps, log_every, ...) are no mismatch
    own = toy_config(tmp_path, total_steps=40, checkpoint_every=20,
                     run_dir=str(tmp_path / "own"))
    train(own)
    assert load_checkpoint(tmp_path / "own" / "checkpoint.pt")["config"]["total_steps"] == 40
    assert train(replace(own, total_steps=60, log_every=10), resume=True).steps == 60


@pytest.mark.parametrize("kind", ["dangling link", "directory"])
def test_a_checkpoint_that_is_not_a_file_is_named_as_such(tmp_path, kind):
    from mtrl.checkpoint import CheckpointError

    cfg = toy_config(tmp_path, total_steps=40, checkpoint_every=20)
    train(cfg)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    ckpt.unlink()
    if kind == "directory":
        ckpt.mkdir()
        why = "is not a file"
    else:
        ckpt.symlink_to(tmp_path / "unmounted.pt")
        why = f"is a link to '{tmp_path / 'unmounted.pt'}', which does not exist"
    with pytest.raises(CheckpointError, match=f"checkpoint '{ckpt}' {why}"):
        train(replace(cfg, total_steps=60), resume=True)
    (tmp_path / "run" / "result.json").unlink()
    with pytest.raises(ConfigError, match="already holds a checkpoint"):
        train(cfg)  # nor is it taken for no checkpoint by a fresh run


def test_tensorboard_that_cannot_write_is_warned_about_and_the_run_goes_on(tmp_path):
    """tb/ replaced by a file (or not writable): TensorBoard was switched off silently."""
    pytest.importorskip("tensorboard")
    cfg = toy_config(tmp_path, total_steps=40, checkpoint_every=20)
    train(cfg)
    run = tmp_path / "run"
    shutil.rmtree(run / "tb")
    (run / "tb").write_text("")
    with pytest.warns(UserWarning, match=r"TensorBoard logging is off for this run: cannot "
                      r"write to '.*tb' \(.*File exists.*\); metrics\.jsonl and eval\.jsonl "
                      "are written as usual"):
        assert train(replace(cfg, total_steps=60), resume=True).steps == 60
    assert [r["step"] for r in _jsonl(run / "metrics.jsonl")] == [20, 40, 60]


def test_training_statistics_skip_windows_without_finished_episodes(tmp_path):
    cfg = toy_config(tmp_path, total_steps=42, log_every=7, warmup_steps=10)  # episodes: 20
    result = train(cfg)
    logs = {m["step"]: m for m in _jsonl(result.run_dir / "metrics.jsonl")}
    for step in (7, 14, 28, 35):  # no episode ended in these windows: no number, not 0
        assert logs[step]["train_return"] is None and logs[step]["train_success"] is None
        assert logs[step]["train_episodes"] == 0
    for step in (21, 42):  # all four tasks ended one (steps 20 and 40)
        assert logs[step]["train_episodes"] == 4 and logs[step]["train_tasks_ended"] == 4
        assert isinstance(logs[step]["train_return"], float) and logs[step]["train_return"] < 0


def test_run_files_are_readable_like_any_new_file(tmp_path):
    result = train(toy_config(tmp_path, total_steps=30))
    mask = os.umask(0)
    os.umask(mask)
    for name in ("checkpoint.pt", "config.json", "result.json", "metrics.jsonl"):
        assert (result.run_dir / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


def test_a_batch_that_does_not_split_into_the_tasks_fails_before_the_envs_are_built(
        tmp_path, monkeypatch):
    import mtrl.envs.vec

    def no_envs(*args, **kwargs):
        raise AssertionError("the envs were built before the check")

    monkeypatch.setattr(mtrl.envs.vec, "_build_vector_env", no_envs)
    cfg = replace(toy_config(tmp_path), env=EnvConfig(benchmark="MT10"), batch_size=1285)
    with pytest.raises(ConfigError, match=r"batch_size 1285 must be divisible by the 10 tasks "
                       r"for stratified sampling \(the nearest that are: 1280 or 1290\)$"):
        train(cfg)


def test_refuses_to_overwrite_a_run_without_resume(tmp_path):
    cfg = toy_config(tmp_path, total_steps=45)
    train(cfg)
    with pytest.raises(ConfigError, match="already holds a checkpoint"):
        train(cfg)


@pytest.mark.parametrize("leftover", ["metrics.jsonl", "eval.jsonl", "result.json", "tb"])
def test_refuses_a_run_directory_with_logs_but_no_checkpoint(tmp_path, leftover):
    """A run killed before its first checkpoint leaves logs: a new run there appended to
    them (metrics steps 50..550 then 50..300 in one file)."""
    cfg = toy_config(tmp_path, total_steps=45)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")  # alone it is no log: overwritten
    (run / leftover).mkdir() if leftover == "tb" else (run / leftover).write_text("{}\n")
    with pytest.raises(ConfigError, match=rf"holds logs of an earlier run \({leftover}\) but "
                       "no checkpoint to resume from; delete them"):
        train(cfg)
    assert sorted(p.name for p in run.iterdir()) == sorted(["config.json", leftover])
    (run / leftover).rmdir() if leftover == "tb" else (run / leftover).unlink()
    assert train(cfg).steps == 45


def test_a_resumed_run_hides_the_lost_sessions_tensorboard_events(tmp_path):
    """Killed (here: an env error) at step 90 after its checkpoint at 60: metrics up to 80
    were logged. The resumed run logs 61..100 again; JSONL is cut back to 60, and
    TensorBoard's events after 60 must be purged too (steps 80 showed twice)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = toy_config(tmp_path, total_steps=100, checkpoint_every=60)
    with pytest.raises(RuntimeError, match="killed"):
        train(cfg, env_factory=lambda c: EnvFailsAt(c, 89, RuntimeError("killed")))
    train(cfg, resume=True)
    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("env_steps_per_s")]
    assert steps == [20, 40, 60, 80, 100]


def test_the_progress_bar_shows_an_evaluation_when_it_is_made(tmp_path, monkeypatch):
    """The bar's success= was set only at log steps, before the evaluation of the same
    step: a new result appeared one log interval late."""
    import mtrl.trainer

    shown = []

    class Bar:
        def __init__(self, total, initial, enabled):
            self.n = initial

        def set_postfix(self, **kwargs):
            shown.append((self.n, kwargs["success"]))

        def update(self, k):
            self.n += k

        def write(self, text):
            pass

        def close(self):
            pass

    monkeypatch.setattr(mtrl.trainer, "Progress", Bar)
    cfg = toy_config(tmp_path, total_steps=100, eval_every=50, log_every=25, progress=True)
    result = train(cfg)
    at_50 = [s for n, s in shown if n == 49]  # (the bar advances after the step's work)
    assert at_50[0] == "n/a" and at_50[-1] != "n/a"  # log first, then the evaluation
    assert shown[-1][1] == f"{result.final_eval['mean_success']:.2f}"


def test_window_throughput_leaves_out_evaluations_and_checkpoints(tmp_path, monkeypatch):
    """metrics.jsonl's env_steps_per_s is the training throughput of its window: an
    evaluation or checkpoint made in the window does not lower it (it did until
    2026-11-29). Each evaluation and checkpoint here takes 1000 s on a fake clock."""
    import time

    import mtrl.trainer

    jump = [0.0]
    real_clock = time.perf_counter
    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + jump[0])
    real_evaluate, real_save = mtrl.trainer.evaluate, mtrl.trainer.save_checkpoint

    def slow_evaluate(*args, **kwargs):
        jump[0] += 1000.0
        return real_evaluate(*args, **kwargs)

    def slow_save(*args, **kwargs):
        jump[0] += 1000.0
        return real_save(*args, **kwargs)

    monkeypatch.setattr(mtrl.trainer, "evaluate", slow_evaluate)
    monkeypatch.setattr(mtrl.trainer, "save_checkpoint", slow_save)
    cfg = toy_config(tmp_path, total_steps=100, eval_every=20, checkpoint_every=40,
                     log_every=20)
    result = train(cfg)
    run = result.run_dir
    windows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [w["step"] for w in windows] == [20, 40, 60, 80, 100]
    # 20 vector steps of the toy env in well under 1000 s: counting one pause would put
    # a window below 20 * K / 1000 env-steps/s
    num_tasks = windows[0]["env_steps"] // 20
    assert all(w["env_steps_per_s"] > 20 * num_tasks / 1000 for w in windows), windows
    evals = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [20, 40, 60, 80, 100]
    assert all(1000 <= e["eval_s"] < 1100 for e in evals), [e["eval_s"] for e in evals]
    # the whole-run figure counts everything: 5 evaluations and 3 checkpoints
    summary = json.loads((run / "result.json").read_text())
    assert summary["wall_clock_s"] >= 8000
    assert summary["env_steps_per_s"] == pytest.approx(100 * num_tasks
                                                        / summary["wall_clock_s"])


class NaNRewardAfter:
    """Wraps the toy env; rewards become NaN from a given step on."""

    def __init__(self, cfg, start: int, signal_at: int | None = None, signum=signal.SIGINT,
                 before_signal=None):
        self.env = make_envs(cfg)
        self.start, self.signal_at, self.t = start, signal_at, 0
        self.signum, self.before_signal = signum, before_signal

    def __getattr__(self, name):
        return getattr(self.env, name)

    def step(self, action):
        out = self.env.step(action)
        self.t += 1
        if self.signal_at is not None and self.t == self.signal_at:
            if self.before_signal is not None:
                self.before_signal()
            os.kill(os.getpid(), self.signum)
        if self.t >= self.start:
            out = out._replace(reward=torch.full_like(out.reward, float("nan")))
        return out


class EnvFailsAt(NaNRewardAfter):
    """The toy env whose step raises ``exc`` once it has made ``at`` steps (a killed
    process, dead env workers), after calling ``before`` if given."""

    def __init__(self, cfg, at: int, exc: BaseException, before=None):
        super().__init__(cfg, 10**9)
        self.at, self.exc, self.before = at, exc, before

    def step(self, action):
        if self.t == self.at:
            if self.before is not None:
                self.before()
            raise self.exc
        return super().step(action)


@pytest.mark.parametrize(("guard", "stop_step"), [("sync", None), ("masked", 60)])
def test_nan_updates_are_skipped_and_the_run_stops_with_good_checkpoint(tmp_path, guard,
                                                                         stop_step):
    cfg = toy_config(tmp_path, total_steps=200, checkpoint_every=50, max_consecutive_skips=5,
                     sac=SACConfig(hidden_sizes=(32, 32), nan_guard=guard))
    # From step 51 on, NaN rewards enter the buffer; updates that sample them are skipped.
    # The "sync" guard reads skips every step; "masked" only at logs (every 20 steps) and
    # checkpoints, so it stops at the first of those after the 5th consecutive skip.
    with pytest.raises(TrainingError, match="consecutive updates had NaN/Inf") as err:
        train(cfg, env_factory=lambda c: NaNRewardAfter(c, start=51))
    step, count = map(int, re.search(r"step (\d+): (\d+) consecutive", str(err.value)).groups())
    if stop_step is None:
        assert 55 <= step < 60 and count == 5
    else:
        assert step == stop_step and count >= 5
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["step"] == 50
    for key, value in state["agent"].items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), key


def test_consecutive_skips_go_on_counting_across_a_resume(tmp_path):
    """A run stopped in the middle of a run of skipped updates and resumed stops where
    the uninterrupted run does (the count restarted at 0 on resume until 2026-11-29, so
    a resumed run allowed up to 2 * max_consecutive_skips - 1 skips in a row)."""
    def config(name):
        return toy_config(tmp_path, run_dir=str(tmp_path / name), total_steps=200,
                          checkpoint_every=1000, max_consecutive_skips=5)

    with pytest.raises(TrainingError, match="consecutive updates") as whole:
        train(config("whole"), env_factory=lambda c: NaNRewardAfter(c, start=51))
    result = train(config("split"),
                   env_factory=lambda c: NaNRewardAfter(c, start=51, signal_at=54))
    assert result.interrupted and result.steps == 54
    state = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert state["skip_run"] >= 1  # the checkpoint falls inside the run of skips
    # (the resumed session's env counts its steps from 1: NaN from step 55 on, as before)
    with pytest.raises(TrainingError, match="consecutive updates") as split:
        train(config("split"), resume=True, env_factory=lambda c: NaNRewardAfter(c, start=1))
    assert str(split.value).split(";")[0] == str(whole.value).split(";")[0]


def test_skip_counter_reads_back_only_on_check_and_catches_ended_runs(tmp_path):
    counter = _SkipCounter(torch.device("cpu"), limit=3, total=4)
    for s in (0, 1, 1, 0, 1):
        counter.add(torch.tensor(float(s)))
    assert counter.check(7, tmp_path) == 7  # longest run 2 < 3; total 4 + 3
    for s in (1, 1):  # the run of 1 before the check continues: 3
        counter.add(torch.tensor(float(s)))
    with pytest.raises(TrainingError, match="step 9: 3 consecutive updates"):
        counter.check(9, tmp_path)
    counter = _SkipCounter(torch.device("cpu"), limit=2, total=0)
    for s in (1, 1, 0, 0):  # a run that ended before the check still counts
        counter.add(torch.tensor(float(s)))
    with pytest.raises(TrainingError, match="2 consecutive"):
        counter.check(4, tmp_path)
    assert counter.check(5, tmp_path) == 2  # reported once; the run has ended


def test_ctrl_c_writes_a_checkpoint_and_resume_finishes(tmp_path):
    cfg = toy_config(tmp_path, total_steps=100, checkpoint_every=1000)
    result = train(cfg, env_factory=lambda c: NaNRewardAfter(c, start=10**9, signal_at=70))
    assert result.interrupted and result.steps == 70
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 70
    done = train(cfg, resume=True)
    assert done.steps == 100 and not done.interrupted


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_write_a_checkpoint_like_ctrl_c(tmp_path, signum, monkeypatch):
    import mtrl.runtime

    # a hangup sends stdout/stderr (unless they are files) to /dev/null: recorded here,
    # not done (pytest's capture files would be kept anyway; to_devnull has its own test)
    redirected = []
    monkeypatch.setattr(mtrl.runtime, "to_devnull",
                        lambda fds, keep_files=False: redirected.append((tuple(fds), keep_files)))
    # closing a terminal delivers SIGHUP twice (bash forwards one, the kernel sends one):
    # that is not "a second signal, stop at once"
    twice = (lambda: os.kill(os.getpid(), signum)) if signum == signal.SIGHUP else None
    cfg = toy_config(tmp_path, total_steps=100, checkpoint_every=1000)
    result = train(cfg, env_factory=lambda c: NaNRewardAfter(c, 10**9, 50, signum=signum,
                                                              before_signal=twice))
    assert result.interrupted and result.steps == 50
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 50
    assert signal.getsignal(signum) is signal.SIG_DFL  # the previous handler is back
    # once per hangup session (the second SIGHUP is ignored), never for SIGTERM
    assert redirected == ([((1, 2), True)] if signum == signal.SIGHUP else [])


class WorkersKilledBySigterm(NaNRewardAfter):
    """SIGTERM sent to the whole process group (a scheduler's time limit): the async env
    workers die with the trainer's signal, so what the trainer asks of them afterwards
    fails (as AsyncVectorEnv does: EOFError on a step, BrokenPipeError on close)."""

    def __init__(self, cfg, signal_at: int | None):
        super().__init__(cfg, 10**9, signal_at, signum=signal.SIGTERM)
        self.dead = signal_at is None  # None: the evaluation envs, dead from the start

    def step(self, action):
        if self.dead:
            raise EOFError
        out = super().step(action)
        self.dead = self.t == self.signal_at
        return out

    def close(self):
        self.env.close()
        if self.dead:
            raise BrokenPipeError(32, "Broken pipe")


def test_a_group_sigterm_that_kills_the_env_workers_still_writes_the_checkpoint(tmp_path):
    """The signal arrives during step 50's env step; the evaluation due at step 50 and the
    closing of both env sets then fail. The run used to end with a raw EOFError and no
    checkpoint."""
    cfg = toy_config(tmp_path, total_steps=100, checkpoint_every=1000, eval_every=50)
    built = []

    def factory(c):
        built.append(WorkersKilledBySigterm(c, signal_at=None if built else 50))
        return built[-1]

    with pytest.warns(UserWarning, match="closing the environments failed: BrokenPipeError"):
        result = train(cfg, env_factory=factory)
    assert len(built) == 2  # training and evaluation envs
    # step 50 finished (its update ran); the signal is seen at its end
    assert result.interrupted and result.steps == 50 and result.final_eval is None
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 50
    assert not (tmp_path / "run" / "eval.jsonl").exists()
    done = train(cfg, resume=True)
    assert done.steps == 100 and not done.interrupted


def test_env_workers_dying_mid_step_after_a_stop_request_checkpoint_the_last_full_step(
        tmp_path):
    """Here the stop request is seen only after the env step of step 61 failed: step 61
    did not happen, step 60 is checkpointed."""
    cfg = toy_config(tmp_path, total_steps=100, checkpoint_every=1000)

    def sigterm():
        os.kill(os.getpid(), signal.SIGTERM)  # handled before the env step raises

    result = train(cfg, env_factory=lambda c: EnvFailsAt(
        c, 60, ConnectionResetError(104, "Connection reset by peer"), before=sigterm))
    assert result.interrupted and result.steps == 60
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 60


def test_env_failure_without_a_stop_request_is_raised(tmp_path):
    cfg = toy_config(tmp_path, total_steps=100, checkpoint_every=1000)
    with pytest.raises(EOFError, match="worker gone"):
        train(cfg, env_factory=lambda c: EnvFailsAt(c, 30, EOFError("worker gone")))


def test_sighup_ignored_under_nohup_stays_ignored(tmp_path):
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        cfg = toy_config(tmp_path, total_steps=60, checkpoint_every=1000)
        result = train(cfg, env_factory=lambda c: NaNRewardAfter(c, 10**9, 30,
                                                                  signum=signal.SIGHUP))
        assert not result.interrupted and result.steps == 60
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


@pytest.mark.parametrize("terminal", [True, False], ids=["bar", "lines"])
def test_ctrl_c_with_a_dead_stderr_pipe_still_writes_the_checkpoint(tmp_path, monkeypatch,
                                                                   terminal):
    """`mtrl train ... 2>&1 | tee log`: Ctrl-C kills tee too, and the progress bar's next
    write raised BrokenPipeError before the loop saw the interrupt (no checkpoint). Both
    forms of the progress (a tqdm bar on a terminal, lines elsewhere) write at every
    step here."""
    import io
    import sys

    import mtrl.progress

    monkeypatch.setattr(mtrl.progress, "_isatty", lambda stream: terminal)
    monkeypatch.setattr(mtrl.progress.Progress, "LINE_INTERVAL_S", 0.0)

    class PipeToDeadTee(io.StringIO):
        broken = False

        def write(self, text):
            if self.broken:
                raise BrokenPipeError(32, "Broken pipe")
            return super().write(text)

        def flush(self):
            if self.broken:
                raise BrokenPipeError(32, "Broken pipe")

    stderr = PipeToDeadTee()
    monkeypatch.setattr(sys, "stderr", stderr)
    cfg = toy_config(tmp_path, total_steps=100, checkpoint_every=1000, progress=True)
    result = train(cfg, env_factory=lambda c: NaNRewardAfter(
        c, 10**9, 70, before_signal=lambda: setattr(stderr, "broken", True)))
    assert result.interrupted and result.steps == 70
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 70


def test_training_progress_off_a_terminal_shows_steps_and_evaluations(tmp_path, monkeypatch,
                                                                      capsys):
    """Under nohup / ``2> log``: plain progress lines of the training steps and of each
    evaluation's vector-env steps (here one line per step: interval 0)."""
    from mtrl.progress import Progress

    monkeypatch.setattr(Progress, "LINE_INTERVAL_S", 0.0)
    cfg = toy_config(tmp_path, total_steps=40, eval_every=20, eval_episodes=1, progress=True)
    train(cfg)
    err = capsys.readouterr().err
    first, *lines = err.splitlines()
    assert first == "building the toy environments ..." and "\r" not in err
    train_lines = [line.split(" steps")[0] for line in lines if not line.startswith("eval")]
    assert train_lines == [f"{n}/40" for n in range(41)]
    # evaluations at steps 20 and 40, each 1 episode of the mtrl protocol's 150 steps
    eval_lines = [line.split(" steps")[0] for line in lines if line.startswith("eval")]
    assert eval_lines == [f"eval: {n}/150" for n in range(1, 151)] * 2


def test_a_run_shorter_than_warmup_is_warned(tmp_path):
    cfg = toy_config(tmp_path, total_steps=30, warmup_steps=40)
    with pytest.warns(UserWarning, match=r"total_steps 30 <= 40, .*no gradient update"):
        train(cfg)


def test_unknown_config_key_names_key_and_valid_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) sac\.hiden_sizes.*valid keys:.*"
                       r"hidden_sizes"):
        from_dict(TrainConfig, {"sac": {"hiden_sizes": [3]}})
    with pytest.raises(ConfigError, match="unknown config key.*bogus.*valid keys: env, sac"):
        from_dict(TrainConfig, {"bogus": 1})
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_preset(p)
    with pytest.raises(ConfigError, match="not found; presets: .*mt10_cagrad"):
        load_preset(tmp_path / "missing.json")
    # a directory was "not found"; a binary file gave a bare codec error naming no file
    with pytest.raises(ConfigError, match=r"config file '.*' is a directory"):
        load_preset(tmp_path)
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match=r"config file '.*bin.json' is not text \(UTF-8 JSON\)"):
        load_preset(tmp_path / "bin.json")
    with pytest.raises(ConfigError, match=r"config section 'sac' must be an object, got 5"):
        from_dict(TrainConfig, {"sac": 5})


@pytest.mark.parametrize(("data", "message"), [
    ({"stratified": "false"}, "stratified must be true or false, got 'false'"),
    ({"device": 5}, "device must be a string, got 5"),
    ({"balancer_kwargs": [1]}, "balancer_kwargs must be an object"),
    ({"sac": {"actor_lr": "3e-4"}}, "sac.actor_lr must be a number, got '3e-4'"),
    ({"sac": {"hidden_sizes": 400}}, r"sac.hidden_sizes must be a list \(each an integer\)"),
    ({"sac": {"log_std_bounds": [-5]}}, r"sac.log_std_bounds must be a list of 2"),
    ({"protocol": "atari"}, 'protocol must be one of "mtrl", "metaworld-plus"'),
    ({"eval_episodes": 2.5}, "eval_episodes must be an integer or null, got 2.5"),
    ({"env": {"seed": True}}, "env.seed must be an integer, got True"),
])
def test_json_values_of_the_wrong_type_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(TrainConfig, data)


def test_json_numbers_and_lists_convert_to_the_field_types():
    cfg = from_dict(TrainConfig, {"sac": {"actor_lr": 1, "hidden_sizes": [8, 8],
                                          "log_std_bounds": [-5, 2]},
                                  "balancer_kwargs": {"c": 1, "seed": 3}})  # fmt: skip
    assert cfg.sac.actor_lr == 1.0 and isinstance(cfg.sac.actor_lr, float)
    assert cfg.sac.hidden_sizes == (8, 8) and cfg.sac.log_std_bounds == (-5.0, 2.0)
    assert cfg.balancer_kwargs == {"c": 1, "seed": 3}


@pytest.mark.parametrize("device", ["cuda:x", "cudaa", "gpu", "cpu:0:1"])
def test_bad_device_names_are_config_errors(tmp_path, device):
    from mtrl.trainer import resolve_device

    with pytest.raises(ConfigError, match="device"):
        train(toy_config(tmp_path, device=device))
    if device != "cudaa":
        with pytest.raises(ConfigError, match=f"invalid device '{device}'; valid: auto, cpu"):
            resolve_device(device)


def test_invalid_values_are_rejected_before_training(tmp_path):
    with pytest.raises(ConfigError, match="unknown balancer 'nope'; valid choices: .*cagrad"):
        train(toy_config(tmp_path, balancer="nope"))
    with pytest.raises(ConfigError, match="unknown hyper-parameter.*cc.*valid hyper-parameters: c"):
        train(toy_config(tmp_path, balancer="cagrad", balancer_kwargs={"cc": 1.0}))
    with pytest.raises(ConfigError, match=r"batch_size 30 must be divisible by the 4 tasks "
                       r"for stratified sampling \(the nearest that are: 28 or 32\)$"):
        train(toy_config(tmp_path, batch_size=30))
    with pytest.raises(ConfigError, match="total_steps must be an integer >= 1"):
        train(toy_config(tmp_path, total_steps=0))
    # 100,000 threads crashed the process without a word; 1e9 updates per step ignored
    # every stop signal
    with pytest.raises(ConfigError, match=r"threads 100000 is more than 4 per usable core "
                       r"\(\d+ here\): at most \d+"):
        train(toy_config(tmp_path, threads=100000))
    with pytest.raises(ConfigError, match=r"updates_per_step 1001 is above 1000"):
        train(toy_config(tmp_path, updates_per_step=1001))
    with pytest.raises(ValueError, match="balance has unknown loss.*valid: critic, actor"):
        SACConfig(balance=("critic", "policy"))
    with pytest.raises(ConfigError, match="section 'sac'.*unknown loss.*policy"):
        from_dict(TrainConfig, {"sac": {"balance": ["critic", "policy"]}})
    with pytest.raises(ConfigError, match="'famo' needs non-negative task losses.*actor, alpha"):
        train(toy_config(tmp_path, balancer="famo"))
    with pytest.raises(ConfigError, match="stratified=False.*sac.balance=\\[\\]"):
        train(toy_config(tmp_path, stratified=False))
    # a batch larger than the buffer (1e14 rows: an allocation failure deep in sampling)
    with pytest.raises(ConfigError, match="batch_size 100000000000000 exceeds buffer_capacity"):
        train(toy_config(tmp_path, batch_size=10**14))
    assert not (tmp_path / "run").exists()  # made for the run's lock, removed: it was empty


def test_a_buffer_too_large_for_memory_is_a_one_line_config_error(tmp_path):
    """A raw torch allocator traceback before; and the run directory it left was refused."""
    cfg = toy_config(tmp_path, buffer_capacity=10**14)
    with pytest.raises(ConfigError, match=r"cannot allocate the replay buffer for "
                       r"buffer_capacity 100000000000000 on cpu \(~.* GiB\).*--buffer-capacity"):
        train(cfg)
    assert not (tmp_path / "run").exists()
    assert train(replace(cfg, buffer_capacity=4000, total_steps=5)).steps == 5


def test_mps_without_mps_is_a_config_error(tmp_path, monkeypatch):
    from mtrl.trainer import resolve_device

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device 'mps' requested but MPS is not available"):
        resolve_device("mps")


def test_env_device_set_apart_from_device_is_warned_as_ignored(tmp_path):
    with pytest.warns(UserWarning, match="env.device 'cuda:3' is ignored.*learner's device \\(cpu"):
        train(toy_config(tmp_path, total_steps=5, env=replace(toy_config(tmp_path).env,
                                                              device="cuda:3")))


def test_an_env_device_without_index_is_the_current_cuda_device(monkeypatch):
    """``cuda`` is the current CUDA device: it matches ``cuda:N`` only for that N (it
    matched every ``cuda:N``, so a mismatched env.device went unwarned)."""
    from mtrl.trainer import _same_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    cuda = torch.device("cuda")
    assert not _same_device("cuda:3", cuda) and not _same_device("cuda:0", cuda)
    assert _same_device("cuda:1", cuda) and _same_device("cuda", cuda)
    assert not _same_device("cuda", torch.device("cuda:0"))
    assert _same_device("cuda", torch.device("cuda:1"))
    assert _same_device("cpu:0", torch.device("cpu")) and _same_device("cpu", torch.device("cpu"))
    assert not _same_device("cpu", cuda) and not _same_device("cuda:x", cuda)


def test_one_training_process_per_run_directory(tmp_path):
    """Two `mtrl train` on one run directory (a command run twice, --resume of a live run)
    both "finished", every log line twice, a config.json that need not match the
    checkpoint. Now the second is refused before it builds its envs, whatever the first
    has written so far; the lock goes with the process."""
    from mtrl.trainer import exclusive_run_dir

    cfg = toy_config(tmp_path, total_steps=45)
    run = tmp_path / "run"
    built = []

    def factory(c):
        built.append(c)
        return make_envs(c)

    with exclusive_run_dir(run):  # another process holds the run (flock: per open file)
        for resume in (False, True):
            with pytest.raises(ConfigError, match="another mtrl process is training in .*run"):
                train(cfg, resume=resume, env_factory=factory)
    assert built == [] and not run.exists()
    assert train(cfg).steps == 45
    with exclusive_run_dir(run):
        with pytest.raises(ConfigError, match="another mtrl process is training"):
            train(replace(cfg, total_steps=60), resume=True)
    assert train(replace(cfg, total_steps=60), resume=True).steps == 60


def test_checkpoint_temp_files_of_a_killed_run_are_removed(tmp_path):
    """A SIGKILL during a checkpoint write leaves `.checkpoint.pt.<random>.tmp` (6.6 MB at
    3×400, hundreds of MB with the buffer); resume kept it forever."""
    cfg = toy_config(tmp_path, total_steps=45)
    train(cfg)
    run = tmp_path / "run"
    stale = [run / f".{name}.k1ll3d.tmp" for name in (  # (the JSON ones too, 2026-11-29)
        "checkpoint.pt", "config.json", "result.json", "metrics.jsonl", "eval.jsonl")]
    for path in stale:
        path.write_bytes(b"x" * 100)
    other = run / ".eval_45.json.abc.tmp"  # `mtrl eval` may be writing this one right now
    other.write_text("{}")
    assert train(replace(cfg, total_steps=50), resume=True).steps == 50
    assert not any(path.exists() for path in stale) and other.exists()


def test_a_failed_checkpoint_write_says_where_and_keeps_the_previous_one(tmp_path, monkeypatch):
    """A full disk: torch.save raised `RuntimeError: [enforce fail at inline_container.cc:672]
    . unexpected pos 180416 vs 180304` (a traceback from the trainer, no path, no hint)."""
    from mtrl import checkpoint as ckpt_mod

    path = tmp_path / "checkpoint.pt"
    ckpt_mod.save_checkpoint(path, {"format": 1, "step": 1})
    before = path.read_bytes()

    def full_disk(obj, f):
        with open(f, "wb") as out:
            out.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1 vs 2")

    monkeypatch.setattr(ckpt_mod.torch, "save", full_disk)
    with pytest.raises(OSError, match=r"could not write checkpoint '.*checkpoint.pt' \([\d,]+ "
                       r"MiB free there; the previous checkpoint, if any, is kept\): "
                       r"\[enforce fail"):
        ckpt_mod.save_checkpoint(path, {"format": 1, "step": 2})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_a_failed_log_write_names_the_log(tmp_path, monkeypatch):
    """A full disk while appending to metrics.jsonl printed only `error: [Errno 28] No
    space left on device`."""
    import errno
    import io

    import mtrl.trainer as trainer_module

    class FullDisk(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    log = trainer_module._MetricsLog(tmp_path)
    monkeypatch.setattr(trainer_module, "open", lambda *a, **k: FullDisk(), raising=False)
    with pytest.raises(OSError, match=r"\[Errno 28\] No space left on device: "
                       r"'.*metrics\.jsonl'") as caught:
        log.write("metrics.jsonl", {"step": 1})
    assert caught.value.errno == errno.ENOSPC
    log.close()


def test_a_directory_named_like_a_preset_does_not_hide_it(tmp_path, monkeypatch):
    """An earlier `--run-dir mt10_cagrad` in the working directory made `--config
    mt10_cagrad` fail with IsADirectoryError."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mt10_cagrad").mkdir()
    (tmp_path / "mt10_mean.json").mkdir()
    assert load_preset("mt10_cagrad").balancer_kwargs == {"c": 0.9}
    assert load_preset("mt10_mean.json").balancer == "mean"


@pytest.mark.skipif(not os.path.isdir("/dev/fd"), reason="needs /dev/fd")
def test_a_preset_can_come_from_a_pipe(tmp_path):
    """`--config <(jq ... preset.json)`: bash passes /dev/fd/N, a pipe, not a regular file."""
    import threading
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "configs" / "mt10_cagrad.json").read_text()
    r, w = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(w, text.encode()), os.close(w)))
    writer.start()
    try:
        cfg = load_preset(f"/dev/fd/{r}")
    finally:
        writer.join()
        os.close(r)
    assert cfg.balancer == "cagrad" and cfg.balancer_kwargs == {"c": 0.9}


def test_presets_load_with_published_hyper_parameters():
    assert load_preset("mt10_cagrad").balancer_kwargs == {"c": 0.9}
    assert load_preset("mt50_cagrad").balancer_kwargs == {"c": 0.5}
    assert load_preset("mt10_sdmgrad").balancer_kwargs == {"lam": 0.6}
    assert load_preset("mt10_sdmgrad_os").balancer_kwargs["num_sampled"] == 4
    assert load_preset("mt50_sdmgrad_os").balancer_kwargs["num_sampled"] == 8
    assert load_preset("mt10_fairgrad").balancer_kwargs == {"alpha": 2.0}
    famo = load_preset("mt10_famo")
    assert famo.balancer_kwargs == {"gamma": 0.01, "lr": 0.025}
    assert famo.sac.balance == ("critic",)
    mt10 = load_preset("mt10_mean")
    assert mt10.batch_size == 1280 and mt10.sac.hidden_sizes == (400, 400, 400)
    assert mt10.env.max_episode_steps == 150 and mt10.env.goal_mode == "fixed"


def test_uniform_sampling_and_multihead_train(tmp_path):
    """The original mtrl setting (uniform batches, plain mean loss) with the multi-head SAC."""
    cfg = toy_config(tmp_path, stratified=False, batch_size=30, total_steps=80,
                     sac=SACConfig(hidden_sizes=(32, 32), multihead=True, balance=()))
    result = train(cfg)
    assert result.steps == 80 and result.skipped_updates == 0
    last = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(last["critic/loss"]) and len(last["critic/losses"]) == 4
    saved = json.loads((result.run_dir / "config.json").read_text())
    assert saved["stratified"] is False and saved["sac"]["multihead"] is True


def test_extending_a_run_drops_its_old_result_and_a_lost_sessions_logs(tmp_path):
    cfg = toy_config(tmp_path, total_steps=40, checkpoint_every=20, eval_every=10)
    train(cfg)
    run = tmp_path / "run"
    assert (run / "result.json").is_file()
    for name in ("eval.jsonl", "metrics.jsonl"):  # records of a session lost after step 40
        with open(run / name, "a") as f:
            f.write(json.dumps({"step": 45, "lost": True}) + "\n")
    # extend to 100 steps; interrupted at step 50: the run is unfinished again
    made = []

    def factory(c):  # Ctrl-C from the training env only (the eval env is built later)
        made.append(c)
        return NaNRewardAfter(c, start=10**9, signal_at=10) if len(made) == 1 else make_envs(c)

    part = train(replace(cfg, total_steps=100), resume=True, env_factory=factory)
    assert part.interrupted and part.steps == 50
    assert not (run / "result.json").exists()
    for name in ("eval.jsonl", "metrics.jsonl"):
        records = _jsonl(run / name)
        assert not any(r.get("lost") for r in records), name
        steps = [r["step"] for r in records]  # evaluations every 10, logs every 20
        assert steps == ([10, 20, 30, 40, 50] if name == "eval.jsonl" else [20, 40]), steps
    done = train(replace(cfg, total_steps=100), resume=True)
    assert done.steps == 100 and json.loads((run / "result.json").read_text())["step"] == 100


def test_resume_accepts_a_config_written_before_a_setting_existed(tmp_path):
    cfg = toy_config(tmp_path, total_steps=40, checkpoint_every=20)
    train(cfg)
    (tmp_path / "run" / "result.json").unlink()
    path = tmp_path / "run" / "config.json"
    saved = json.loads(path.read_text())
    del saved["sac"]["nan_guard"], saved["save_buffer"]  # as an older version wrote it
    path.write_text(json.dumps(saved))
    assert train(replace(cfg, total_steps=60), resume=True).steps == 60


def test_resume_at_the_last_step_without_result_evaluates_once(tmp_path):
    """Stopped after the final checkpoint, before result.json: the resume writes the
    result from the logged final evaluation instead of evaluating that step again."""
    cfg = toy_config(tmp_path, total_steps=40, checkpoint_every=20, eval_every=20)
    first = train(cfg)
    (tmp_path / "run" / "result.json").unlink()
    again = train(cfg, resume=True)
    assert not again.already_finished and again.final_eval == first.final_eval
    assert [e["step"] for e in _jsonl(tmp_path / "run" / "eval.jsonl")] == [20, 40]
    assert json.loads((tmp_path / "run" / "result.json").read_text())["final_eval"]["step"] == 40


def test_generator_states_from_another_device_type_are_reseeded(tmp_path):
    """A CUDA generator's state (16 bytes) cannot go into a CPU generator: the run resumes
    with reseeded generators and a warning, instead of failing."""
    from mtrl.checkpoint import save_checkpoint

    cfg = toy_config(tmp_path, total_steps=40, checkpoint_every=20)
    train(cfg)
    (tmp_path / "run" / "result.json").unlink()
    ckpt = tmp_path / "run" / "checkpoint.pt"
    state = load_checkpoint(ckpt)
    state["rng"]["actions"] = torch.zeros(16, dtype=torch.uint8)
    state["buffer"]["generator"] = torch.zeros(16, dtype=torch.uint8)
    save_checkpoint(ckpt, state)
    with pytest.warns(UserWarning, match="saved on another device type"):
        assert train(replace(cfg, total_steps=60), resume=True).steps == 60


def test_file_modes_are_read_without_changing_the_umask(monkeypatch, tmp_path):
    import mtrl.checkpoint as ckpt_mod

    if not os.path.exists("/proc/self/status"):
        pytest.skip("reads the umask from /proc")
    mask = os.umask(0o022)
    os.umask(mask)

    def no_umask(_):  # another thread would see umask 0 in between
        raise AssertionError("os.umask called")

    monkeypatch.setattr(ckpt_mod.os, "umask", no_umask)
    ckpt_mod.atomic_write_text(tmp_path / "x.json", "{}")
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o666 & ~mask


def test_balancer_kwargs_take_any_json_value_and_presets_may_be_run_configs(tmp_path):
    cfg = from_dict(TrainConfig, {"balancer": "pcgrad", "balancer_kwargs": {"seed": None}})
    assert cfg.balancer_kwargs == {"seed": None}
    with pytest.raises(ConfigError, match="sac.gamma is too large"):
        from_dict(TrainConfig, {"sac": {"gamma": 10**400}})
    result = train(toy_config(tmp_path, total_steps=30))
    preset = load_preset(result.run_dir / "config.json")  # task_names and run_dir dropped
    assert preset.total_steps == 30 and preset.run_dir is None
    with pytest.raises(ConfigError, match=r"balancer_kwargs must be an object \(hyper-param"):
        from_dict(TrainConfig, {"balancer_kwargs": [1]})


def test_the_stop_message_says_whether_a_checkpoint_exists(tmp_path):
    counter = _SkipCounter(torch.device("cpu"), limit=1, total=0)
    counter.add(torch.tensor(1.0))
    with pytest.raises(TrainingError, match="no checkpoint had been written yet"):
        counter.check(3, tmp_path / "checkpoint.pt")
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    counter.add(torch.tensor(1.0))
    with pytest.raises(TrainingError, match="last good checkpoint is kept at"):
        counter.check(4, tmp_path / "checkpoint.pt")


def test_a_preset_section_keeps_the_training_defaults_it_does_not_name():
    """TrainConfig's env default follows the default (mtrl) protocol: 150-step episodes,
    fixed goals; a preset naming only the benchmark keeps them."""
    assert TrainConfig().env.max_episode_steps == 150 and TrainConfig().env.goal_mode == "fixed"
    cfg = from_dict(TrainConfig, {"env": {"benchmark": "MT50"}})
    assert (cfg.env.benchmark, cfg.env.max_episode_steps, cfg.env.goal_mode) == (
        "MT50", 150, "fixed")


def test_resume_without_a_buffer_refills_it_before_updating(tmp_path):
    cfg = toy_config(tmp_path, total_steps=60, checkpoint_every=60, save_buffer=False)
    train(cfg)
    (tmp_path / "run" / "result.json").unlink()
    with pytest.warns(UserWarning, match="updates resume after step 100"):
        train(replace(cfg, total_steps=120), resume=True)
    logs = {m["step"]: m for m in _jsonl(tmp_path / "run" / "metrics.jsonl")}
    assert "critic/loss" in logs[60]  # updated before the checkpoint
    assert "critic/loss" not in logs[80] and "critic/loss" not in logs[100]  # refilling
    assert "critic/loss" in logs[120]


def test_a_refill_in_progress_survives_another_resume(tmp_path):
    """Saved without a buffer at 60 (refill until 100), resumed, checkpointed at 70 with a
    buffer, resumed again: the same run as one resume from 60 to 120."""
    base = toy_config(tmp_path, total_steps=60, checkpoint_every=60, save_buffer=False)
    for name in ("a", "b"):
        train(replace(base, run_dir=str(tmp_path / name)))
        (tmp_path / name / "result.json").unlink()
    with pytest.warns(UserWarning, match="updates resume after step 100"):
        one = train(replace(base, run_dir=str(tmp_path / "a"), total_steps=120), resume=True)
    with pytest.warns(UserWarning, match="updates resume after step 100"):
        train(replace(base, run_dir=str(tmp_path / "b"), total_steps=70, save_buffer=True),
              resume=True)  # fmt: skip
    (tmp_path / "b" / "result.json").unlink()
    two = train(replace(base, run_dir=str(tmp_path / "b"), total_steps=120, save_buffer=True),
                resume=True)  # fmt: skip
    a, b = (load_checkpoint(r.run_dir / "checkpoint.pt")["agent"] for r in (one, two))
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: s.update(format=2), "has format 2; this mtrl reads formats 1 to 1"),
    (lambda s: s.pop("optim"), "lacks 'optim'"),
])
def test_newer_or_incomplete_checkpoints_are_refused_before_anything_is_written(
        tmp_path, edit, message):
    from mtrl.checkpoint import CheckpointError, save_checkpoint

    cfg = toy_config(tmp_path, total_steps=40, checkpoint_every=20)
    train(cfg)
    (tmp_path / "run" / "result.json").unlink()
    ckpt = tmp_path / "run" / "checkpoint.pt"
    state = load_checkpoint(ckpt)
    edit(state)
    save_checkpoint(ckpt, state)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    with pytest.raises(CheckpointError, match=message):
        train(replace(cfg, total_steps=60), resume=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == before


def test_a_checkpoint_carrying_code_is_refused_without_running_it(tmp_path):
    import pickle

    from mtrl.checkpoint import CheckpointError

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(pickle.dumps({"format": 1, "step": 1, "agent": Payload()}, protocol=2))
    with pytest.raises(CheckpointError, match="never unpickles code"):
        load_checkpoint(ckpt)
    assert not marker.exists()
    ckpt.write_bytes(b"garbage, not a zip file")
    with pytest.raises(CheckpointError, match="is corrupt or not an mtrl checkpoint") as err:
        load_checkpoint(ckpt)
    assert "weights_only" not in str(err.value)  # torch's advice to load it unsafely
    ckpt.write_text('{"a JSON file": "given as the checkpoint"}')
    with pytest.raises(CheckpointError, match=r"not an mtrl checkpoint \(torch's weights-only"):
        load_checkpoint(ckpt)
    ckpt.write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty or truncated"):
        load_checkpoint(ckpt)


def test_training_on_other_episodes_than_the_protocol_evaluates_is_warned(tmp_path):
    import warnings

    from mtrl.trainer import _warn_if_protocol_differs

    def no_envs(_cfg):
        raise RuntimeError("stop before building envs")

    cfg = TrainConfig(protocol="metaworld-plus", run_dir=str(tmp_path / "run"))
    with pytest.warns(UserWarning, match=re.escape(
        "training episodes (150 steps, fixed goals) differ from the episodes the "
        "'metaworld-plus' protocol evaluates (500 steps, random goals); to train on those, "
        "pass --env.max-episode-steps 500 --env.goal-mode random"
    )), pytest.raises(RuntimeError, match="stop before"):
        train(cfg, env_factory=no_envs)
    matching = replace(cfg, env=replace(cfg.env, max_episode_steps=500, goal_mode="random"))
    toy = replace(cfg, env=EnvConfig(benchmark="toy", max_episode_steps=20))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for ok in (matching, TrainConfig(), toy):  # TrainConfig(): mtrl protocol, 150 / fixed
            _warn_if_protocol_differs(ok)
    with pytest.warns(UserWarning, match=r"\(500 steps, random goals\) differ .*'mtrl'"):
        _warn_if_protocol_differs(replace(matching, protocol="mtrl"))


def test_logging_out_sends_sighup_and_sigterm_together_and_still_checkpoints(tmp_path,
                                                                           monkeypatch):
    """systemd stopping a login session: SIGHUP, then SIGTERM. The SIGTERM was taken for
    'a second signal, stop at once' (no checkpoint)."""
    import mtrl.runtime

    monkeypatch.setattr(mtrl.runtime.os, "dup2", lambda fd, to: None)
    hangup = lambda: os.kill(os.getpid(), signal.SIGHUP)  # noqa: E731
    cfg = toy_config(tmp_path, total_steps=100, checkpoint_every=1000)
    result = train(cfg, env_factory=lambda c: NaNRewardAfter(c, 10**9, 40, signum=signal.SIGTERM,
                                                              before_signal=hangup))
    assert result.interrupted and result.steps == 40
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 40


def test_an_evaluation_out_of_memory_keeps_the_run(tmp_path, monkeypatch):
    """--eval-episodes 1e9: NumPy could not allocate the evaluation's 29.8 GiB at the final
    evaluation, a raw traceback, and the run was lost (the final checkpoint came after the
    evaluation, so only logs were left and a rerun was refused). Now the training state is
    checkpointed at that step and the error says what to do."""
    import mtrl.trainer as trainer_mod

    real = trainer_mod.evaluate

    def huge(*args, **kwargs):
        raise MemoryError("Unable to allocate 29.8 GiB for an array")

    cfg = toy_config(tmp_path, total_steps=50, checkpoint_every=1000)
    monkeypatch.setattr(trainer_mod, "evaluate", huge)
    with pytest.raises(TrainingError, match=r"the evaluation at step 50 ran out of memory "
                       r"\(Unable to allocate 29.8 GiB for an array\); the run is "
                       r"checkpointed at step 50 in .*checkpoint.pt: resume it with a smaller "
                       r"--eval-episodes \(now 1\)"):
        train(cfg)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 50
    monkeypatch.setattr(trainer_mod, "evaluate", real)
    done = train(cfg, resume=True)
    assert done.steps == 50 and done.final_eval["step"] == 50


def test_out_of_memory_is_one_line_from_the_cli(tmp_path, monkeypatch, capsys):
    import mtrl.trainer as trainer_mod
    from mtrl.cli import main

    def oom(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 400000000000 bytes.")

    monkeypatch.setattr(trainer_mod, "MultiTaskSAC", oom)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--env.benchmark", "toy", "--total-steps", "5", "--no-progress",
              "--run-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: out of memory: [enforce fail at alloc_cpu.cpp:117] data. "
                              "DefaultCPUAllocator: can't allocate memory")


def test_a_checkpoint_is_never_written_with_nan_weights(tmp_path, monkeypatch):
    """--sac.actor-lr 1e308 (now refused) made the weights NaN in one step from finite
    losses and gradients: every later update was skipped, and the "last good checkpoint"
    of the stop message held NaN weights. Weights that went non-finite now stop the run at
    the next checkpoint, which keeps the previous one."""
    from mtrl.agents.sac import MultiTaskSAC

    real = MultiTaskSAC.update
    calls = []

    def update(self, batch):
        out = real(self, batch)
        calls.append(1)
        if len(calls) == 50:  # after the step-60 checkpoint
            with torch.no_grad():
                next(self.actor.parameters()).fill_(float("inf"))
        return out

    monkeypatch.setattr(MultiTaskSAC, "update", update)
    with pytest.raises(TrainingError, match=r"stopped at step 120: the weights actor\.\S+ are "
                       r"NaN/Inf .*; the last good checkpoint is kept at .*checkpoint.pt"):
        train(toy_config(tmp_path))
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["step"] == 60
    assert all(torch.isfinite(v).all() for v in state["agent"].values() if v.is_floating_point())


def test_fallback_counts_are_logged_and_survive_a_resume(tmp_path):
    """The count of balanced updates whose balancer fell back goes into metrics.jsonl and
    the checkpoint; a resumed run goes on counting (80 updates after warm-up at step 120,
    then 40 more)."""
    cfg = toy_config(tmp_path, balancer="test_agent:AlwaysFallsBack", total_steps=120,
                     sac=SACConfig(hidden_sizes=(16, 16), balance=("critic",)))
    with pytest.warns(UserWarning, match="fell back: test fallback"):
        train(cfg)
    run = Path(cfg.run_dir)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    counts = {r["step"]: r.get("critic/fallback_updates") for r in records}
    assert counts[60] == 20 and counts[120] == 80, counts
    assert load_checkpoint(run / "checkpoint.pt")["fallback_updates"] == {"critic": 80}
    train(replace(cfg, total_steps=160), resume=True)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert (last["step"], last["critic/fallback_updates"]) == (160, 120)


def test_train_runs_outside_the_main_thread(tmp_path):
    """(Mutation testing:) signal handlers can only be installed from the main thread; a
    run started from a worker thread (a notebook's, a thread pool's) trains without them
    instead of failing with "signal only works in main thread"."""
    import threading

    done: dict[str, object] = {}

    def work() -> None:
        try:
            done["result"] = train(toy_config(tmp_path, total_steps=50, warmup_steps=40))
        except BaseException as exc:  # noqa: BLE001 - reported below
            done["error"] = exc

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert "error" not in done, done.get("error")
    assert done["result"].steps == 50


def test_a_buffer_smaller_than_the_task_count_is_refused(tmp_path):
    """(Mutation testing:) uniform sampling, no balancing, batch 2: 2 buffer slots for 4
    tasks trained silently with one slot for some tasks and none for others."""
    cfg = toy_config(tmp_path, stratified=False, batch_size=2, buffer_capacity=2,
                     sac=SACConfig(hidden_sizes=(16, 16), balance=()))
    with pytest.raises(ConfigError, match="^buffer_capacity must be at least the 4 tasks$"):
        train(cfg)
