"""Report outputs (summary.json fields, table columns, notes, plotted data, --out, --reps)
and the bench's config plumbing (deep merge, runtime keys, refused options, worker count,
bench.json paths), checked on hand-made run logs; nothing is trained."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_report import CAGRAD_RUNS, MEAN_RUNS, TASKS, numbers, parse_table, write_run

import mtrl.bench
import mtrl.report
from mtrl.bench import (
    BenchSpec,
    local_slots,
    parse_balancers,
    parse_overrides,
    plan_runs,
    run_bench,
    run_config,
)
from mtrl.cli import main
from mtrl.config import ConfigError
from mtrl.report import write_report

REPS, POI_REPS = 120, 30  # REPS > 50, POI_REPS != REPS: each must reach its bootstrap
ENV_STEPS_PER_S = {("mean", 0): 1000.0, ("mean", 1): 2000.0, ("mean", 2): 3000.0,
                   ("cagrad", 0): 500.0, ("cagrad", 1): 700.0}


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------------- mtrl protocol
@pytest.fixture(scope="module")
def mtrl_report(tmp_path_factory):
    """The runs of test_report's mtrl_bench, plus an unfinished run logged up to step 20
    (with a checkpoint) and one without a checkpoint; the report's figures are kept (not
    rendered) by name."""
    root = tmp_path_factory.mktemp("mtrl") / "bench"
    for name, runs in (("mean", MEAN_RUNS), ("cagrad", CAGRAD_RUNS)):
        for seed, evals in runs.items():
            d = root / "runs" / name / f"seed{seed}"
            write_run(d, name, seed, {k: [float(x) for x in v] for k, v in evals.items()})
            _edit_json(d / "result.json", env_steps_per_s=ENV_STEPS_PER_S[(name, seed)])
    write_run(root / "runs" / "cagrad" / "seed2", "cagrad", 2,
              {10: [1.0] * 4, 20: [0.0] * 4}, finished=False)
    write_run(root / "runs" / "mean" / "seed3", "mean", 3, {10: [1.0] * 4}, finished=False)
    (root / "runs" / "mean" / "seed3" / "checkpoint.pt").unlink()
    figures = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mtrl.report, "_save", lambda fig, path: figures.__setitem__(path.name, fig))
        report = write_report(root, reps=REPS, poi_reps=POI_REPS)
    summary = json.loads((root / "summary.json").read_text())
    return root, report, summary, figures


def test_curves_are_over_env_steps(mtrl_report):
    """The learning curve's x axis (summary.json and plot) is env steps, 4 per vector step."""
    _, _, summary, figures = mtrl_report
    for name in ("mean", "cagrad"):
        curve = summary["groups"][0]["methods"][name]["curve"]
        assert curve["step"] == [10, 20, 30]
        assert curve["env_steps"] == [40, 80, 120]
    (ax,) = figures["learning_curves_mt10_mtrl.png"].axes
    assert ax.get_xlabel() == "environment steps (all tasks)"
    assert len(ax.get_lines()) == 2
    for line in ax.get_lines():
        assert list(line.get_xdata()) == [40, 80, 120]


def test_env_steps_per_s_column_is_the_runs_rate(mtrl_report):
    """The env-steps/s column and field average the runs' env_steps_per_s, not env_steps."""
    root, _, summary, _ = mtrl_report
    table = {r["balancer"]: r for r in parse_table((root / "summary.md").read_text(),
                                                  "balancer")}
    assert table["mean"]["env-steps/s"] == "2,000" and table["mean"]["env steps"] == "120"
    assert table["cagrad"]["env-steps/s"] == "600"
    methods = summary["groups"][0]["methods"]
    assert methods["mean"]["env_steps_per_s"] == pytest.approx(2000.0)
    assert methods["cagrad"]["env_steps_per_s"] == pytest.approx(600.0)


def test_summary_json_best_step_and_per_task_seed_means(mtrl_report):
    """best_over_time_step is the curve's best step (20), not the last; final_task_success
    is the seed mean of each task."""
    _, _, summary, _ = mtrl_report
    mean = summary["groups"][0]["methods"]["mean"]
    assert (mean["best_over_time"], mean["best_over_time_step"]) == (pytest.approx(0.75), 20)
    assert summary["groups"][0]["methods"]["cagrad"]["best_over_time_step"] == 20
    assert mean["final_task_success"] == pytest.approx(
        {"task-a": 1.0, "task-b": 2 / 3, "task-c": 1 / 3, "task-d": 0.0})


def test_runs_not_in_the_statistics_table(mtrl_report):
    """Its 'last logged step' is a run's latest step; only a run with a checkpoint is told
    to resume."""
    root, _, _, _ = mtrl_report
    rows = {r["run directory"]: r
            for r in parse_table((root / "summary.md").read_text(), "run directory")}
    assert set(rows) == {"runs/cagrad/seed2", "runs/mean/seed3"}
    assert rows["runs/cagrad/seed2"]["last logged step"] == "20"
    assert rows["runs/cagrad/seed2"]["state"] == "checkpoint, no result.json (resume it)"
    assert rows["runs/mean/seed3"]["last logged step"] == "10"
    assert rows["runs/mean/seed3"]["state"] == "no checkpoint, no result.json"


def test_learning_curve_band_is_one_standard_error(mtrl_report):
    """The plotted band spans mean ± 1 s.e. over seeds at each evaluation."""
    _, _, _, figures = mtrl_report
    (ax,) = figures["learning_curves_mt10_mtrl.png"].axes
    per_seed = {s: [np.mean(MEAN_RUNS[s][step]) for step in (10, 20, 30)] for s in MEAN_RUNS}
    values = np.array(list(per_seed.values()))  # seeds x steps (seed 0's stale 30 dropped)
    mean, se = values.mean(axis=0), values.std(axis=0, ddof=1) / math.sqrt(3)
    band = ax.collections[0]  # the first method's: mean
    vertices = np.concatenate([p.vertices for p in band.get_paths()])
    for x, m, s in zip((40, 80, 120), mean, se, strict=True):
        ys = vertices[np.isclose(vertices[:, 0], x), 1]
        assert ys.min() == pytest.approx(m - s) and ys.max() == pytest.approx(m + s)


def test_heatmap_shows_the_seed_mean(mtrl_report):
    """Each heatmap cell is a task's final success averaged over seeds."""
    _, _, _, figures = mtrl_report
    data = np.asarray(figures["task_heatmap_mt10_mtrl.png"].axes[0].images[0].get_array())
    np.testing.assert_allclose(data, [[1.0, 2 / 3, 1 / 3, 0.0], [1.0, 1.0, 1.0, 0.5]])


def test_diagnostics_show_the_seed_mean(mtrl_report):
    """Weight and conflict plots average the metric over a method's seeds."""
    _, _, _, figures = mtrl_report
    axes = figures["diagnostics_weights_mt10_mtrl.png"].axes
    critic_mean, critic_cagrad = axes[0], axes[1]  # rows: critic, actor; columns: methods
    for ax, seed_mean in ((critic_mean, 1.0), (critic_cagrad, 0.5)):
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == TASKS
        for i, line in enumerate(lines):
            assert list(line.get_xdata()) == [40, 80, 120]
            np.testing.assert_allclose(line.get_ydata(), 0.25 + 0.01 * seed_mean * (i - 1.5))
    conflict = figures["diagnostics_conflict_mt10_mtrl.png"].axes[0]
    ys = {line.get_label(): line.get_ydata() for line in conflict.get_lines()}
    np.testing.assert_allclose(ys["mean"], [0.1] * 3)  # 0.1 * seed over seeds 0, 1, 2
    np.testing.assert_allclose(ys["cagrad"], [0.05] * 3)


# ---------------------------------------------------------------------- metaworld-plus
MWP_MEAN = {0: [0.0, 0.1, 0.2, 0.3], 1: [0.4, 0.5, 0.8, 0.9], 2: [0.6] * 4}


@pytest.fixture(scope="module")
def mwp_report(tmp_path_factory):
    """mean with 3 seeds, fairgrad with 1 (metaworld-plus), reported by ``mtrl report DIR
    --out OTHER --reps 120 --poi-reps 30``; the reps each bootstrap got are recorded."""
    base = tmp_path_factory.mktemp("mwp")
    root, other = base / "runs", base / "report"
    for seed, final in MWP_MEAN.items():
        write_run(root / "mean" / f"seed{seed}", "mean", seed, {100: [0.0] * 4, 200: final},
                  protocol="metaworld-plus")
    write_run(root / "fairgrad" / "seed0", "fairgrad", 0, {100: [0.5] * 4, 200: [0.7] * 4},
              protocol="metaworld-plus")
    calls = []
    original = mtrl.report._bootstrap

    def recording(library, name, data, fn, reps, seed):
        calls.append((name, reps))
        return original(library, name, data, fn, reps, seed)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mtrl.report, "_bootstrap", recording)
        main(["report", str(root), "--out", str(other), "--reps", str(REPS),
              "--poi-reps", str(POI_REPS), "--no-plots"])
    return root, other, calls


def test_report_out_writes_into_the_other_folder(mwp_report):
    """``mtrl report DIR --out OTHER`` writes its files into OTHER and none into DIR."""
    root, other, _ = mwp_report
    assert {p.name for p in other.iterdir()} == {"results.csv", "summary.md", "summary.json"}
    assert not any((root / name).exists()
                   for name in ("results.csv", "summary.md", "summary.json"))


def test_reps_and_poi_reps_reach_their_bootstraps(mwp_report):
    """--reps sizes the mean/IQM bootstraps and --poi-reps the probability of improvement's."""
    _, other, calls = mwp_report
    assert sorted(calls) == sorted([("mean", REPS), ("fairgrad", REPS),
                                    ("mean,fairgrad", POI_REPS)])
    summary = json.loads((other / "summary.json").read_text())
    assert (summary["bootstrap_reps"], summary["poi_bootstrap_reps"]) == (REPS, POI_REPS)
    md = (other / "summary.md").read_text()
    assert f"(rliable, {REPS} resamples)" in md and f"rliable, {POI_REPS} resamples)" in md


def test_summary_json_iqm_is_the_iqms_interval(mwp_report):
    """summary.json's "iqm" holds the IQM and its CI, not the mean's."""
    _, other, _ = mwp_report
    methods = json.loads((other / "summary.json").read_text())["groups"][0]["methods"]
    # 12 scores sorted: 0 .1 .2 .3 .4 .5 .6 .6 .6 .6 .8 .9; IQM = mean of the middle 6
    iqm, mean = methods["mean"]["iqm"], methods["mean"]["mean"]
    assert iqm["point"] == pytest.approx(0.5) and mean["point"] == pytest.approx(5.6 / 12)
    assert iqm["low"] <= 0.5 <= iqm["high"]
    md = (other / "summary.md").read_text()
    row = {r["balancer"]: r for r in parse_table(md, "balancer")}["mean"]
    assert numbers(row["IQM [95% CI]"]) == [pytest.approx(x, abs=5e-4) for x in
                                            (iqm["point"], iqm["low"], iqm["high"])]


def test_poi_against_a_single_seed_method_has_no_interval(mwp_report):
    """3 seeds vs 1: the probability of improvement gets no CI (n/a), both ways."""
    _, other, _ = mwp_report
    poi = json.loads((other / "summary.json").read_text())["groups"][0][
        "probability_of_improvement"]
    for pair in ("mean > fairgrad", "fairgrad > mean"):
        assert poi[pair]["point"] is not None
        assert (poi[pair]["low"], poi[pair]["high"]) == (None, None), poi
    md = (other / "summary.md").read_text()
    assert "P(mean > fairgrad) = " in md and md.split("P(mean > fairgrad) = ")[1].split(
        "\n")[0].endswith("[n/a, n/a]")


# ---------------------------------------------------------------------- notes and errors
def test_two_lengths_and_two_episode_counts_are_noted(tmp_path):
    """Two run lengths, or two episodes-per-task values, pooled in a group get their note."""
    for seed, last, episodes in ((0, 30, 1), (1, 40, 2)):
        d = tmp_path / "mean" / f"seed{seed}"
        write_run(d, "mean", seed, {10: [0.0] * 4, last: [1.0] * 4})
        _edit_json(d / "config.json", total_steps=last)
        final = json.loads((d / "result.json").read_text())["final_eval"]
        _edit_json(d / "result.json", final_eval={**final, "episodes_per_task": episodes})
    (g,) = write_report(tmp_path, reps=REPS, poi_reps=POI_REPS, plots=False).groups
    assert "runs of different lengths are pooled (total_steps [30, 40])" in g.warnings
    assert ("final evaluations with different episodes per task are pooled ([1, 2])"
            in g.warnings)
    md = (tmp_path / "summary.md").read_text()
    assert "**Note:** runs of different lengths are pooled" in md
    assert "episodes per task per evaluation: 1, 2." in md


@pytest.mark.parametrize("option", ["--reps", "--poi-reps"])
def test_zero_reps_is_one_clear_error(tmp_path, capsys, option):
    """``mtrl report DIR --reps 0`` (or --poi-reps 0) exits 2 with one error line."""
    for seed in range(2):
        write_run(tmp_path / "mean" / f"seed{seed}", "mean", seed, {10: [1.0] * 4},
                  protocol="metaworld-plus")
        write_run(tmp_path / "cagrad" / f"seed{seed}", "cagrad", seed, {10: [0.5] * 4},
                  protocol="metaworld-plus")
    out = tmp_path / "elsewhere"
    with pytest.raises(SystemExit) as exc:
        main(["report", str(tmp_path), option, "0", "--no-plots", "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: bootstrap repetitions must be >= 1, got {option} 0\n"
    assert not out.exists()  # a refused report makes no --out directory


# ---------------------------------------------------------------------- bench
def test_set_merges_into_the_presets_sections(tmp_path):
    """--set adds to a preset's balancer_kwargs and sac section instead of replacing them."""
    os_cfg = run_config("MT10", "sdmgrad-os", 0, 1000, "mtrl", tmp_path / "r",
                        overrides=parse_overrides(["balancer_kwargs.num_sampled=2"]))
    assert os_cfg.balancer_kwargs == {"lam": 0.6, "num_sampled": 2}
    famo = run_config("MT10", "famo", 0, 1000, "mtrl", tmp_path / "r",
                      overrides=parse_overrides(["sac.actor_lr=0.001"]))
    assert famo.sac.balance == ("critic",) and famo.sac.actor_lr == 0.001
    assert famo.balancer_kwargs == {"gamma": 0.01, "lr": 0.025}
    assert (famo.batch_size, famo.env.max_episode_steps) == (1280, 150)


@pytest.mark.parametrize(("key", "value"), [
    ("env.device", "cuda"), ("save_buffer", False), ("max_consecutive_skips", 7),
    ("checkpoint_every", 123), ("device", "cuda"), ("log_every", 5), ("eval_every", 5),
    ("threads", 4), ("progress", True),
])
def test_an_existing_run_may_differ_in_runtime_settings(tmp_path, key, value):
    """A finished run whose config differs only in a setting a resume may change is done."""
    spec = BenchSpec(benchmark="toy", balancers=("mean",), seeds=1, steps=40, out=tmp_path)
    (plan,) = plan_runs(spec)
    config = json.loads(json.dumps(plan.config))
    if key.startswith("env."):
        config["env"][key.split(".")[1]] = value
    else:
        config[key] = value
    plan.run_dir.mkdir(parents=True)
    (plan.run_dir / "config.json").write_text(json.dumps(config))
    (plan.run_dir / "result.json").write_text(json.dumps({"step": 40}))
    assert plan_runs(spec)[0].state == "done"


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "threads=4"], "--set threads=... is set by the bench; use --threads-per-run"),
    (["--balancers", "mean,mean"], "--balancers lists mean more than once"),
    # inside an object too (two seeds of one bench were both seed 7)
    (["--set", 'env={"seed": 7}'], "--set env.seed=... is set by the bench; use --seeds"),
    (["--set", 'env={"benchmark": "MT10"}'],
     "--set env.benchmark=... is set by the bench; use --benchmark"),
    (["--gpus-per-run", "1e-300"], "--gpus-per-run must be 0 (no GPU) or at least 0.01"),
])
def test_bench_refuses(tmp_path, capsys, args, message):
    """--set threads (the launcher's) and a balancer named twice are one clear error."""
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--benchmark", "toy", "--balancers", "mean", "--seeds", "1", "--steps",
              "10", "--out", str(tmp_path / "out"), "--no-progress", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "out" / "runs").exists()


def test_a_balancer_listed_twice_is_refused():
    """parse_balancers names each balancer listed more than once."""
    with pytest.raises(ConfigError, match="^--balancers lists cagrad more than once$"):
        parse_balancers(["cagrad", "mean", "cagrad"])


def test_local_slots_run_at_least_one_run(monkeypatch):
    """2 cores with 4 threads per run: one run at a time, not none."""
    monkeypatch.setattr(mtrl.bench, "_cpu_count", lambda: 2)
    monkeypatch.setattr(mtrl.bench, "_gpu_count", lambda: 0)
    spec = BenchSpec(benchmark="toy", balancers=("mean",), seeds=1, steps=1, threads_per_run=4)
    assert local_slots(spec, uses_gpu=False) == (1, [None])


def test_bench_json_holds_relative_paths(tmp_path):
    """bench.json records each run's directory and log relative to OUT (no local paths)."""
    spec = BenchSpec(benchmark="toy", balancers=("mean",), seeds=2, steps=40, out=tmp_path,
                     report=False)
    for plan in plan_runs(spec):  # finished runs: the bench launches nothing
        plan.run_dir.mkdir(parents=True)
        (plan.run_dir / "config.json").write_text(json.dumps(plan.config))
        (plan.run_dir / "result.json").write_text(json.dumps({"step": 40}))
    result = run_bench(spec, progress=False)
    assert [o["status"] for o in result.outcomes] == ["done", "done"]
    record = json.loads((tmp_path / "bench.json").read_text())
    assert [(r["run_dir"], r["log"]) for r in record["runs"]] == [
        ("runs/mean/seed0", "runs/mean/seed0/train.log"),
        ("runs/mean/seed1", "runs/mean/seed1/train.log")]
    assert record["command"]["out"] == "."
    assert str(tmp_path) not in (tmp_path / "bench.json").read_text()


def test_a_report_that_runs_out_of_memory_still_shows_the_runs(tmp_path, monkeypatch):
    """`--reps 100000000000`: the report's MemoryError escaped run_bench after every run had
    trained, so the table of the runs' outcomes was never printed."""
    spec = BenchSpec(benchmark="toy", balancers=("mean",), seeds=1, steps=40, out=tmp_path)
    for plan in plan_runs(spec):
        plan.run_dir.mkdir(parents=True)
        (plan.run_dir / "config.json").write_text(json.dumps(plan.config))
        (plan.run_dir / "result.json").write_text(json.dumps({"step": 40}))

    def too_big(*args, **kwargs):
        raise MemoryError("Unable to allocate 1.46 TiB for an array")

    monkeypatch.setattr(mtrl.report, "write_report", too_big)
    result = run_bench(spec, progress=False)
    assert [o["status"] for o in result.outcomes] == ["done"]
    assert result.report_error == "Unable to allocate 1.46 TiB for an array"
    assert result.exit_code == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests a machine without CUDA")
def test_dry_run_checks_the_device_of_a_local_bench(tmp_path):
    """`--set device=cuda` without CUDA passed --dry-run; the bench then made its
    directories and every run failed."""
    spec = BenchSpec(benchmark="toy", balancers=("mean",), seeds=1, steps=40,
                     out=tmp_path / "out", overrides=("device=cuda",))
    with pytest.raises(ConfigError, match="CUDA is not available"):
        plan_runs(spec)
    assert not (tmp_path / "out").exists()
