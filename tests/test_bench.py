"""``mtrl bench``: run configs, validation, local and Ray launchers on the toy env, resume,
and failed runs."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mtrl.bench
from mtrl.bench import BenchSpec, local_slots, parse_overrides, plan_runs, run_config
from mtrl.cli import main
from mtrl.config import ConfigError

TINY = [
    "--benchmark", "toy", "--balancers", "mean,cagrad", "--seeds", "2", "--steps", "40",
    "--set", "sac.hidden_sizes=[16,16]", "--set", "batch_size=16", "--set", "warmup_steps=20",
    "--set", "eval_every=20", "--set", "log_every=10", "--set", "buffer_capacity=400",
    "--reps", "200", "--poi-reps", "20", "--no-progress",
]
RUNS = [("mean", 0), ("mean", 1), ("cagrad", 0), ("cagrad", 1)]


def bench(out: Path, *extra: str) -> int:
    try:
        main(["bench", *TINY, "--out", str(out), *extra])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def run_dir(out: Path, balancer: str, seed: int) -> Path:
    return out / "runs" / balancer / f"seed{seed}"


def mtimes(d: Path) -> dict[str, int]:
    return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()}


def check_finished_bench(out: Path) -> None:
    for balancer, seed in RUNS:
        d = run_dir(out, balancer, seed)
        result = json.loads((d / "result.json").read_text())
        assert result["step"] == 40, (d, result)
        config = json.loads((d / "config.json").read_text())
        assert config["env"]["seed"] == seed and config["balancer"] == balancer
        assert config["protocol"] == "mtrl" and config["env"]["max_episode_steps"] == 150
        assert config["env"]["goal_mode"] == "fixed" and config["sac"]["hidden_sizes"] == [16, 16]
        assert config["threads"] == 1 and config["progress"] is False
        assert "mtrl bench: start" in (d / "train.log").read_text()
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 2 * 4  # runs x evaluations (steps 20, 40) x toy tasks
    assert {(r["balancer"], r["seed"]) for r in rows} == {(b, str(s)) for b, s in RUNS}
    md = (out / "summary.md").read_text()
    assert "## toy — `mtrl` protocol" in md
    assert "| mean | 2 |" in md and "| cagrad | 2 |" in md
    assert (out / "learning_curves_toy_mtrl.png").is_file()
    record = json.loads((out / "bench.json").read_text())
    assert [r["status"] for r in record["runs"]] == ["done"] * 4


# ---------------------------------------------------------------------- configs
def test_run_config_uses_preset_then_protocol_then_overrides(tmp_path):
    cfg = run_config("MT10", "cagrad", 3, 1000, "mtrl", tmp_path / "r", threads=2,
                     overrides=parse_overrides(["sac.hidden_sizes=[32,32]", "warmup_steps=10",
                                                "balancer_kwargs.c=0.5"]))
    assert cfg.balancer == "cagrad" and cfg.balancer_kwargs == {"c": 0.5}  # preset c=0.9
    assert cfg.batch_size == 1280 and cfg.eval_every == 10_000  # from configs/mt10_cagrad.json
    assert (cfg.env.benchmark, cfg.env.seed, cfg.total_steps) == ("MT10", 3, 1000)
    assert (cfg.env.max_episode_steps, cfg.env.goal_mode) == (150, "fixed")
    assert cfg.sac.hidden_sizes == (32, 32) and cfg.warmup_steps == 10
    assert (cfg.threads, cfg.progress, cfg.run_dir) == (2, False, str(tmp_path / "r"))

    plus = run_config("MT10", "sdmgrad-os", 0, 1000, "metaworld-plus", tmp_path / "r")
    assert plus.balancer_kwargs["num_sampled"] == 4  # configs/mt10_sdmgrad_os.json
    assert (plus.env.max_episode_steps, plus.env.goal_mode, plus.protocol) == (
        500, "random", "metaworld-plus")

    no_preset = run_config("MT10", "mgda", 0, 1000, "mtrl", tmp_path / "r")
    assert no_preset.balancer == "mgda" and no_preset.balancer_kwargs == {}
    assert no_preset.batch_size == 1280  # TrainConfig default
    assert no_preset.sac.balance == ("critic", "actor", "alpha")
    # FAMO without a preset balances the critic only, as its presets (it was refused: its
    # losses must be non-negative); --set still decides
    famo = run_config("toy", "famo", 0, 1000, "mtrl", tmp_path / "r")
    assert famo.sac.balance == ("critic",)
    assert run_config("toy", "famo", 0, 1000, "mtrl", tmp_path / "r", overrides=parse_overrides(
        ["sac.balance=[]"])).sac.balance == ()


@pytest.mark.parametrize("args, message", [
    (["--benchmark", "MT11"], "unknown benchmark 'MT11'; valid choices: MT10, MT50"),
    (["--balancers", "mean,nope"], "unknown balancer(s) nope; valid: "),
    (["--balancers", "mypkg.balancers:Mine"], "bench takes registered names only: register"),
    (["--seeds", "0"], "--seeds must be an integer >= 1, got 0"),
    (["--steps", "-5"], "--steps must be an integer >= 1, got -5"),
    (["--set", "nope=1"], "unknown config key(s) nope; valid keys: env, sac, balancer"),
    (["--set", "sac.widths=[3]"], "unknown config key(s) sac.widths in section 'sac'"),
    (["--set", "env.seed=3"], "--set env.seed=... is set by the bench; use --seeds"),
    (["--set", "warmup_steps"], "--set expects KEY=VALUE"),
    (["--set", "env.goal_mode=sometimes"], "unknown goal_mode 'sometimes'"),
    (["--launcher", "local", "--address", "ray://x:1"], "--address is only used with"),
    # (it overrode --benchmark silently; the plan then named a preset it did not use)
    (["--set", "env.benchmark=MT10"], "--set env.benchmark=... is set by the bench; use "
     "--benchmark"),
    # (accepted; the report failed after every run had trained)
    (["--reps", "0"], "--reps must be an integer >= 1, got 0"),
    (["--poi-reps", "0", "--dry-run"], "--poi-reps must be an integer >= 1, got 0"),
])
def test_bad_arguments_give_one_clear_error(tmp_path, capsys, args, message):
    base = ["bench", "--benchmark", "toy", "--balancers", "mean", "--seeds", "1", "--steps",
            "10", "--out", str(tmp_path / "out"), "--no-progress"]
    with pytest.raises(SystemExit) as exc:
        main(base + args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "runs").exists()  # nothing was launched


def test_existing_runs_with_another_config_are_refused(tmp_path):
    spec = BenchSpec(benchmark="toy", balancers=("mean",), seeds=1, steps=40, out=tmp_path)
    (plan,) = plan_runs(spec)
    plan.run_dir.mkdir(parents=True)
    (plan.run_dir / "config.json").write_text(json.dumps({**plan.config, "total_steps": 100}))
    (plan.run_dir / "result.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"total_steps: 100 -> 40 \(a bench extends its runs "
                       r"with a larger --steps, it does not shorten them\)"):
        plan_runs(spec)
    sac = {**plan.config["sac"], "hidden_sizes": [7, 7]}  # a nested setting
    (plan.run_dir / "config.json").write_text(json.dumps({**plan.config, "sac": sac}))
    with pytest.raises(ConfigError, match=r"sac.hidden_sizes: \[7, 7\] -> \[400, 400, 400\]"):
        plan_runs(spec)
    # threads/device/progress may change between invocations
    (plan.run_dir / "config.json").write_text(json.dumps({**plan.config, "threads": 4}))
    assert plan_runs(spec)[0].state == "done"


def test_a_result_shorter_than_the_run_is_not_done(tmp_path):
    """A run extended (total_steps raised) and interrupted before the new end: resumed."""
    from mtrl.bench import run_state

    run = tmp_path / "run"
    run.mkdir()
    (run / "result.json").write_text(json.dumps({"step": 40}))
    assert run_state(run) == "done" and run_state(run, 40) == "done"
    assert run_state(run, 100) == "new"  # (plan_runs refuses it: see below)
    (run / "checkpoint.pt").write_bytes(b"")
    assert run_state(run, 100) == "resume" and run_state(run, 30) == "done"
    # a damaged result.json is no result: resumed (the run writes it again), else new
    (run / "result.json").write_text('{"step": 4')
    assert run_state(run) == "resume" and run_state(run, 30) == "resume"
    (run / "checkpoint.pt").unlink()
    assert run_state(run) == "new"
    # a checkpoint.pt that is not a readable file (a directory, a link to a disk that is
    # not mounted) was taken for none: the run's logs were deleted and it started over.
    # As "resume", the run's own error names the file and nothing is deleted.
    (run / "checkpoint.pt").symlink_to(tmp_path / "unmounted" / "checkpoint.pt")
    assert run_state(run) == "resume"
    (run / "checkpoint.pt").unlink()
    (run / "checkpoint.pt").mkdir()
    assert run_state(run) == "resume"


def test_a_finished_run_without_its_checkpoint_is_not_started_again(tmp_path, capsys):
    """Checkpoints deleted to free disk, then --steps raised: the runs were planned as new,
    their results deleted and retrained from step 0 (and a changed setting was not even
    noticed). Likewise a damaged result.json without a checkpoint. Now refused, untouched."""
    out = tmp_path / "bench"
    one = ["--balancers", "mean", "--seeds", "1"]
    assert bench(out, *one) == 0
    run = run_dir(out, "mean", 0)
    (run / "checkpoint.pt").unlink()
    before = mtimes(run)
    capsys.readouterr()
    assert bench(out, *one, "--steps", "60") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: existing run(s) in the output directory cannot be "
                          "continued, and starting them again would delete their results")
    assert f"{run}: finished at step 40, short of --steps (60), and it has no checkpoint.pt" \
        in err
    assert mtimes(run) == before
    assert bench(out, *one) == 0  # at its own length it is simply done
    (run / "result.json").write_text('{"step": 40, "env_')
    before = mtimes(run)
    assert bench(out, *one) == 2
    assert f"{run}: its result.json cannot be read and it has no checkpoint.pt" in \
        capsys.readouterr().err
    assert mtimes(run) == before


def test_a_damaged_result_is_written_again_by_resuming_the_run(tmp_path, capsys):
    """A finished run with a cut result.json: the bench skipped it as finished, the report
    left it out ("checkpoint, no result.json (resume it)") and `mtrl train --resume` said
    "already finished", so the benchmark could never be completed."""
    out = tmp_path / "bench"
    one = ["--balancers", "mean", "--seeds", "1"]
    assert bench(out, *one) == 0
    run = run_dir(out, "mean", 0)
    good = json.loads((run / "result.json").read_text())
    (run / "result.json").write_text((run / "result.json").read_text()[:50])
    from mtrl.report import write_report
    skipped = write_report(out, reps=50, poi_reps=10, plots=False).skipped
    assert [why for _, why in skipped] == [
        "result.json cannot be read (resume it: the run writes it again)"]
    capsys.readouterr()
    assert bench(out, *one) == 0
    assert "1 done" in capsys.readouterr().out
    again = json.loads((run / "result.json").read_text())
    assert (again["step"], again["resumed_from_step"]) == (40, 40)
    assert again["final_eval"]["success"] == good["final_eval"]["success"]
    assert "cannot be read: evaluating the finished run again" in (run / "train.log").read_text()


# ---------------------------------------------------------------------- launchers
def test_local_bench_resume_and_failed_run(tmp_path, capsys):
    out = tmp_path / "bench"
    assert bench(out, "--workers", "2") == 0
    check_finished_bench(out)
    assert "bench: 4 run(s): 4 done" in capsys.readouterr().out

    # Simulate: mean/1 stopped after its last checkpoint (no result.json), cagrad/0 never
    # started, cagrad/1 has a corrupt checkpoint (fails inside the run); mean/0 is finished.
    untouched = mtimes(run_dir(out, "mean", 0))
    (run_dir(out, "mean", 1) / "result.json").unlink()
    for p in sorted(run_dir(out, "cagrad", 0).rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    broken = run_dir(out, "cagrad", 1)
    (broken / "result.json").unlink()
    (broken / "checkpoint.pt").write_bytes(b"garbage, not a zip file")

    assert bench(out, "--workers", "2") == 1
    captured = capsys.readouterr()
    assert "1 skipped (already finished)" in captured.out and "2 done" in captured.out
    assert "FAILED cagrad seed 1" in captured.out
    # the run's error line: once when it fails, once in the summary (the summary had it
    # twice: as the headline and again as the log's last line)
    assert captured.out.count("is corrupt or not an mtrl checkpoint") == 2, captured.out
    assert str(broken / "train.log") in captured.out
    assert "1 of 4 run(s) failed" in captured.err

    assert mtimes(run_dir(out, "mean", 0)) == untouched  # finished run not touched
    resumed = json.loads((run_dir(out, "mean", 1) / "result.json").read_text())
    assert resumed["resumed_from_step"] == 40
    assert "mtrl bench: resume" in (run_dir(out, "mean", 1) / "train.log").read_text()
    fresh = json.loads((run_dir(out, "cagrad", 0) / "result.json").read_text())
    assert fresh["step"] == 40 and fresh["resumed_from_step"] is None
    assert not (broken / "result.json").exists()
    record = json.loads((out / "bench.json").read_text())
    status = {(r["balancer"], r["seed"]): (r["action"], r["status"]) for r in record["runs"]}
    assert status == {("mean", 0): ("skipped", "done"), ("mean", 1): ("resumed", "done"),
                      ("cagrad", 0): ("started", "done"), ("cagrad", 1): ("resumed", "failed")}
    md = (out / "summary.md").read_text()
    assert "| mean | 2 |" in md and "| cagrad | 1 |" in md  # the failed run is left out
    assert "Runs not in the statistics" in md and "| runs/cagrad/seed1 | cagrad | 1 |" in md
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 3 * 2 * 4  # resumed run's duplicate dropped


def test_a_larger_steps_extends_the_runs_of_a_finished_bench(tmp_path, capsys):
    """A finished 40-step bench rerun with --steps 60: its runs were refused as "made with
    a different configuration (total_steps: 40 -> 60)"; now they resume and go on to 60,
    like `mtrl train --resume --total-steps`. Other resume-time settings may change too."""
    out = tmp_path / "bench"
    one = ["--balancers", "mean", "--seeds", "1"]
    assert bench(out, *one) == 0
    capsys.readouterr()
    assert bench(out, *one, "--steps", "60", "--set", "log_every=20") == 0
    assert "1 done" in capsys.readouterr().out
    result = json.loads((run_dir(out, "mean", 0) / "result.json").read_text())
    assert (result["step"], result["resumed_from_step"]) == (60, 40)
    evals = [json.loads(x)["step"] for x in
             (run_dir(out, "mean", 0) / "eval.jsonl").read_text().splitlines()]
    assert evals == [20, 40, 60]
    assert json.loads((out / "bench.json").read_text())["command"]["out"] == "."


def test_a_bench_added_with_other_settings_gets_a_note(tmp_path, capsys):
    """Another balancer added to OUT with another learning rate: accepted (its runs are
    new), and the report says what differs, in summary.md and after the bench."""
    out = tmp_path / "bench"
    assert bench(out, "--balancers", "mean", "--seeds", "1") == 0
    capsys.readouterr()
    assert bench(out, "--balancers", "cagrad", "--seeds", "1", "--set", "sac.actor_lr=0.001") == 0
    note = ("methods trained with different settings are compared: sac.actor_lr 0.0003 (mean) "
            "vs 0.001 (cagrad)")
    assert capsys.readouterr().out.splitlines()[-1] == f"note: {note}"
    assert f"**Note:** {note}." in (out / "summary.md").read_text()


def test_a_run_directory_in_use_is_left_alone(tmp_path, capsys):
    """A run that is training (an `mtrl train` by hand, a run of a killed bench) was
    cleaned up as a dead run's leftovers: its config.json and tb/ deleted under it (it
    crashed on its next TensorBoard write) and the bench's own run failed as well."""
    from mtrl.runtime import run_dir_lock

    out = tmp_path / "bench"
    live = run_dir(out, "mean", 0)
    with run_dir_lock(live):  # what the training process holds
        (live / "tb").mkdir()
        (live / "metrics.jsonl").write_text('{"step": 10}\n')
        before = mtimes(live)
        assert bench(out, "--balancers", "mean", "--seeds", "1") == 1
        assert mtimes(live) == before
    captured = capsys.readouterr()
    assert (f"FAILED mean seed 0 (not started): {live}\n  another mtrl process is training "
            f"in {live}; it was left alone (rerun the bench when that process has ended)"
            in captured.out), captured.out
    assert "full log" not in captured.out


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")
def test_ray_launcher_with_a_local_ray_instance(tmp_path, capsys):
    out = tmp_path / "ray-bench"
    assert bench(out, "--launcher", "ray") == 0
    check_finished_bench(out)
    record = json.loads((out / "bench.json").read_text())
    assert {r["action"] for r in record["runs"]} == {"started"}
    assert all(r["node"] for r in record["runs"])  # ran inside Ray tasks
    # rerunning skips everything (Ray is not even needed then)
    before = {k: mtimes(run_dir(out, b, s)) for k, (b, s) in enumerate(RUNS)}
    assert bench(out, "--launcher", "ray") == 0
    assert {k: mtimes(run_dir(out, b, s)) for k, (b, s) in enumerate(RUNS)} == before
    assert "4 skipped (already finished)" in capsys.readouterr().out


def test_interrupted_bench_checkpoints_and_resumes(tmp_path):
    """SIGINT to the bench: the running run checkpoints and stops, the bench exits 130; the
    same command then resumes it to the end."""
    out = tmp_path / "int"
    args = [*TINY, "--balancers", "mean", "--seeds", "1", "--steps", "1500",
            "--set", "eval_every=500", "--set", "log_every=25", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "mtrl.cli", "bench", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    d = run_dir(out, "mean", 0)
    deadline = time.monotonic() + 90
    while not ((d / "metrics.jsonl").is_file() and (d / "metrics.jsonl").stat().st_size):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    text = proc.communicate(timeout=90)[0]
    assert proc.returncode == 130, text
    assert "1 interrupted" in text and "rerun the same command" in text
    assert (d / "checkpoint.pt").is_file() and not (d / "result.json").exists()
    assert "interrupted at step" in (d / "train.log").read_text()

    assert bench(out, "--balancers", "mean", "--seeds", "1", "--steps", "1500",
                 "--set", "eval_every=500", "--set", "log_every=25") == 0
    result = json.loads((d / "result.json").read_text())
    assert result["step"] == 1500 and 0 < result["resumed_from_step"] < 1500
    with open(out / "results.csv") as f:
        steps = sorted({int(r["step"]) for r in csv.DictReader(f)})
    assert steps == [500, 1000, 1500]


def test_local_slots_share_gpus_by_fraction(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(mtrl.bench, "_cpu_count", lambda: 16)
    spec = BenchSpec(benchmark="toy", balancers=("mean",), seeds=1, steps=1)
    monkeypatch.setattr(mtrl.bench, "_gpu_count", lambda: 0)
    assert local_slots(spec, uses_gpu=True) == (16, [None] * 16)  # CPU only: cores decide
    monkeypatch.setattr(mtrl.bench, "_gpu_count", lambda: 1)
    assert local_slots(spec, uses_gpu=True) == (4, ["0"] * 4)  # 0.25 GPU per run
    assert local_slots(spec, uses_gpu=False) == (16, [None] * 16)  # device=cpu runs
    monkeypatch.setattr(mtrl.bench, "_gpu_count", lambda: 2)
    two = BenchSpec(benchmark="toy", balancers=("mean",), seeds=1, steps=1, gpus_per_run=0.5,
                    threads_per_run=4)
    assert local_slots(two, uses_gpu=True) == (4, ["0", "1", "0", "1"])
    cpu = BenchSpec(benchmark="toy", balancers=("mean",), seeds=1, steps=1, gpus_per_run=0)
    assert local_slots(cpu, uses_gpu=True) == (16, [""] * 16)  # GPUs hidden from the runs
    # the bench itself sees a subset: runs get the parent's names for those GPUs
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-5b1c,3")
    assert local_slots(two, uses_gpu=True) == (4, ["GPU-5b1c", "3", "GPU-5b1c", "3"])


def test_runs_inherit_the_bench_lock(tmp_path, monkeypatch):
    """If the bench dies while runs go on, the runs still hold its lock: a second bench
    cannot start the same runs in the same directories."""
    seen = []

    class Finished:
        returncode = 0

        def __init__(self, cmd, **kwargs):
            seen.append(kwargs.get("pass_fds"))

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(mtrl.bench.subprocess, "Popen", Finished)
    job = mtrl.bench.Job("mean", 0, str(tmp_path / "run"), "{}\n", resume=False, env={},
                         pythonpath="")
    out = tmp_path / "out"
    out.mkdir()
    with mtrl.bench._exclusive(out) as held:
        mtrl.bench.execute_run(job, lock_fd=held)
    mtrl.bench.execute_run(job)
    assert held is not None and seen == [(held,), ()]


def test_a_run_stopped_while_starting_up_is_interrupted_not_failed(tmp_path):
    """Ctrl-C before the trainer's handler is installed: the run dies of SIGINT."""
    spec = BenchSpec(benchmark="toy", balancers=("mean",), seeds=1, steps=40, out=tmp_path)
    (job,) = mtrl.bench._jobs(plan_runs(spec), spec)
    outcome = mtrl.bench.execute_run(job, on_start=lambda p: p.send_signal(signal.SIGINT))
    assert outcome["returncode"] in (-signal.SIGINT, 130)
    assert outcome["status"] == "interrupted"


def test_a_run_that_cannot_be_set_up_fails_alone(tmp_path, capsys):
    """An error preparing one run (here its log path is a directory) is that run's failure:
    the others run, bench.json is written."""
    out = tmp_path / "bench"
    (run_dir(out, "mean", 0) / "train.log").mkdir(parents=True)
    assert bench(out, "--balancers", "mean", "--workers", "1") == 1
    record = json.loads((out / "bench.json").read_text())
    status = {r["seed"]: (r["status"], r["error"] or "") for r in record["runs"]}
    assert status[1][0] == "done"
    assert status[0][0] == "failed"
    assert "could not set up the run: IsADirectoryError" in status[0][1]


def test_dry_run_shows_the_plan_and_launches_nothing(tmp_path, capsys):
    out = tmp_path / "dry"
    main(["bench", "--benchmark", "MT10", "--balancers", "cagrad,mgda", "--seeds", "2",
          "--steps", "100", "--protocol", "metaworld-plus", "--out", str(out), "--dry-run"])
    text = capsys.readouterr().out
    assert "MT10 cagrad(c=0.9) seed 1, 100 steps, metaworld-plus protocol (500-step " in text
    assert "preset mt10_cagrad.json" in text and "no preset: defaults" in text
    assert "4 run(s): 4 to start, 0 to resume, 0 finished" in text
    assert not out.exists()


def test_dry_run_checks_the_batch_against_the_task_count(tmp_path, capsys):
    """Each run used to fail at its start (batch 1000 does not split into MT10's tasks)."""
    out = tmp_path / "dry"
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--benchmark", "MT10", "--balancers", "mean", "--seeds", "1",
              "--steps", "100", "--out", str(out), "--set", "batch_size=1005", "--dry-run"])
    assert exc.value.code == 2
    assert "batch_size 1005 must be divisible by the 10 tasks" in capsys.readouterr().err
    assert not out.exists()


def test_one_bench_at_a_time_per_output_directory(tmp_path, capsys):
    fcntl = pytest.importorskip("fcntl")
    out = tmp_path / "locked"
    out.mkdir()
    with open(out / ".bench.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # "another bench" holds the lock
        assert bench(out) == 2
    assert "another mtrl bench, or runs started by one that was killed, is still running" \
        in capsys.readouterr().err
    assert not (out / "runs").exists()


def finished_run(run, returncode: int, on_start=None):
    """A stand-in for the ``Popen`` of ``mtrl train``: the run writes its result.json
    (step 40) at once, then exits with ``returncode``; ``on_start()`` runs first."""

    class Run:
        def __init__(self, cmd, **kwargs):
            self.returncode = returncode
            if on_start is not None:
                on_start()
            (run / "result.json").write_text(json.dumps({"step": 40}))

        def wait(self, timeout=None):
            return returncode

    return Run


def test_a_run_that_finished_before_the_ctrl_c_reached_it_is_done(tmp_path, monkeypatch):
    """Ctrl-C about a second after a run wrote result.json: the signal lands during its
    clean-up (exit 130), and the bench called the finished run interrupted."""
    run = tmp_path / "run"
    monkeypatch.setattr(mtrl.bench.subprocess, "Popen", finished_run(run, 130))
    job = mtrl.bench.Job("mean", 0, str(run), json.dumps({"total_steps": 40}), resume=False,
                         env={}, pythonpath="")
    assert mtrl.bench.execute_run(job)["status"] == "done"
    # a result of a shorter, earlier session does not make an interrupted extension done
    (run / "result.json").unlink()
    job = mtrl.bench.Job("mean", 0, str(run), json.dumps({"total_steps": 80}), resume=True,
                         env={}, pythonpath="")
    assert mtrl.bench.execute_run(job)["status"] == "interrupted"


def test_a_run_that_fails_after_a_stop_request_is_failed_with_its_error(tmp_path,
                                                                        monkeypatch):
    """The Ray launcher's stop (the stop file) reached a run whose stop checkpoint then
    failed (a full disk): the run exited 1 with its error, and the bench called it
    interrupted, without the error (found by an audit, 2026-11-29)."""
    from mtrl.bench import STOP_NAME, execute_run

    run = tmp_path / "run"
    signals = []

    class Run:
        def __init__(self, cmd, stdout=None, **kwargs):
            self.log, self.returncode, self.polls = stdout, None, 0

        def wait(self, timeout=None):
            self.polls += 1
            if self.polls == 1:  # running: the launcher asks it to stop
                (run / STOP_NAME).touch()
                raise subprocess.TimeoutExpired("mtrl train", timeout)
            self.log.write(b"error: could not write checkpoint 'x' (no space left)\n")
            self.log.flush()
            self.returncode = 1
            return 1

        def send_signal(self, signum):
            signals.append(signum)

    monkeypatch.setattr(mtrl.bench.subprocess, "Popen", Run)
    job = mtrl.bench.Job("mean", 0, str(run), json.dumps({"total_steps": 40}), resume=False,
                         env={}, pythonpath="")
    outcome = execute_run(job)
    assert signals == [signal.SIGINT]
    assert (outcome["status"], outcome["returncode"]) == ("failed", 1), outcome
    assert "could not write checkpoint 'x' (no space left)" in outcome["error"]


def test_a_fresh_start_clears_the_logs_of_a_run_that_died_before_its_checkpoint(
        tmp_path, monkeypatch):
    """``mtrl train`` refuses a run directory that holds logs but no checkpoint; the bench
    restarts such a run, so it removes them first (TensorBoard's directory included)."""
    run = tmp_path / "run"
    (run / "tb").mkdir(parents=True)
    (run / "tb" / "events.out.tfevents.1").write_bytes(b"x")
    for name in ("metrics.jsonl", "eval.jsonl", "result.json", "config.json"):
        (run / name).write_text("{}\n")
    seen = {}

    def started():
        seen["files"] = sorted(p.name for p in run.iterdir())

    monkeypatch.setattr(mtrl.bench.subprocess, "Popen", finished_run(run, 0, started))
    job = mtrl.bench.Job("mean", 0, str(run), json.dumps({"total_steps": 40}), resume=False,
                         env={}, pythonpath="")
    assert mtrl.bench.execute_run(job)["status"] == "done"
    assert not set(seen["files"]) & set(mtrl.bench.STALE_FILES)
    assert set(mtrl.bench.STALE_FILES) == {"config.json", "metrics.jsonl", "eval.jsonl",
                                           "result.json", "tb"}


def test_an_unreachable_ray_address_fails_at_once():
    """`ray.init(address=...)` retries an unreachable cluster for ever (seen: over 10 min)."""
    import socket

    from mtrl.bench import _check_reachable

    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(ConfigError, match=f"could not reach the Ray cluster at "
                           f"'{re.escape(address)}' within 10 s"):
            _check_reachable(address)
    _check_reachable("auto")  # not a host:port: left to Ray


def test_a_bench_stopped_after_all_its_runs_finished_does_not_ask_for_a_rerun(tmp_path):
    """It still said "rerun the same command to resume the unfinished runs"."""
    from mtrl.bench import BenchResult, format_outcomes

    done = {"balancer": "mean", "seed": 0, "run_dir": "r", "action": "started",
            "status": "done", "returncode": 0, "log": "r/train.log", "error": None}
    failed = {**done, "status": "failed", "returncode": 1, "error": "error: x"}
    assert "unfinished" not in format_outcomes(BenchResult(tmp_path, [done], interrupted=True))
    assert "unfinished" in format_outcomes(BenchResult(tmp_path, [done, failed],
                                                       interrupted=True))


def test_the_reports_notes_are_printed_after_the_bench(tmp_path):
    """A bench added to an OUT holding runs made with other settings is accepted (other
    balancers and seeds); the report's note about it was only in summary.md."""
    from mtrl.bench import BenchResult, format_outcomes

    done = {"balancer": "mean", "seed": 0, "run_dir": "r", "action": "started",
            "status": "done", "returncode": 0, "log": "r/train.log", "error": None}
    note = "methods trained with different settings are compared: sac.actor_lr 1 (a) vs 2 (b)"
    text = format_outcomes(BenchResult(tmp_path, [done], report_files=[tmp_path / "summary.md"],
                                       report_notes=[note]))
    assert text.splitlines()[-2:] == [f"report: {tmp_path / 'summary.md'}", f"note: {note}"]


def test_a_stop_file_asks_the_run_to_checkpoint_and_stop(tmp_path):
    """The Ray launcher's stop on Ctrl-C/SIGTERM: ray.cancel alone never reached the task
    waiting on its run (seen: the run trained on to its last step), so the launcher also
    writes OUT/runs/.../.bench-stop, on which the task forwards one SIGINT to its run."""
    import threading

    from mtrl.bench import STOP_NAME, _jobs, execute_run

    spec = BenchSpec(benchmark="toy", balancers=("mean",), seeds=1, steps=100_000,
                     out=tmp_path, overrides=("sac.hidden_sizes=[16,16]", "batch_size=16",
                                              "warmup_steps=20", "eval_every=0",
                                              "buffer_capacity=400"))
    (job,) = _jobs(plan_runs(spec), spec)
    run = Path(job.run_dir)
    run.mkdir(parents=True)
    (run / STOP_NAME).write_text("")  # left by an earlier, stopped bench: not for this run
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(execute_run(job)))
    worker.start()
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (run / "metrics.jsonl").exists() and not (run / STOP_NAME).exists()
    (run / STOP_NAME).touch()
    worker.join(timeout=120)
    assert not worker.is_alive()
    assert (outcome["status"], outcome["returncode"]) == ("interrupted", 130), outcome
    assert "interrupted at step" in (run / "train.log").read_text()
    assert (run / "checkpoint.pt").is_file()
