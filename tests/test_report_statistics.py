"""Report statistics and grouping with numbers fixed by construction: the IQM's own
interval, the interval's 95 % width, probability-of-improvement bounds both ways, runs of
other benchmarks or protocols kept apart, and the final score of runs without final_eval."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_report import POI_REPS, REPS, write_run

from mtrl.report import interval_estimates, probability_of_improvement, write_report


# ---------------------------------------------------------------- report statistics
def test_iqm_interval_is_the_iqms_own_not_the_means():
    """Task a in [0, .1], tasks b, c exactly .5, task d in [.9, 1]: every stratified
    resample drops a's 10 and d's 10 values from the 40, so the IQM is .5 in every resample
    (zero-width CI), while the mean's CI has width."""
    rng = np.random.default_rng(0)
    x = np.column_stack([0.1 * rng.random(10), np.full(10, 0.5), np.full(10, 0.5),
                         0.9 + 0.1 * rng.random(10)])
    est = interval_estimates({"x": x}, reps=REPS)["x"]
    assert est["iqm"] == pytest.approx((0.5, 0.5, 0.5))
    assert est["mean"][2] - est["mean"][1] > 0.01


def test_interval_is_95_percent_wide():
    """10 seeds x 1 task, values 0, .1, ..., .9: bootstrap s.e. of the mean is
    std(ddof=0)/sqrt(10) = .0908; a 95% percentile CI is ~ +-1.96 s.e. (width ~.356), a 50%
    CI ~ +-0.67 s.e. (width ~.12)."""
    x = np.arange(10, dtype=float).reshape(10, 1) / 10
    point, low, high = interval_estimates({"x": x}, reps=2000)["x"]["mean"]
    assert point == pytest.approx(0.45)
    assert 0.30 < high - low < 0.42


def test_probability_of_improvement_intervals_are_ordered_both_ways():
    """For the reverse pair, P(Y > X) = 1 - P(X > Y): its low bound is 1 - high."""
    rng = np.random.default_rng(3)
    a, b = rng.random((5, 4)), rng.random((5, 4)) + 0.15
    poi = probability_of_improvement({"a": a, "b": b}, reps=200)
    for pair in (("a", "b"), ("b", "a")):
        p, low, high = poi[pair]
        assert low <= p <= high, (pair, poi[pair])
        assert high - low > 0.01
    assert poi[("b", "a")][1] == pytest.approx(1 - poi[("a", "b")][2])


# ---------------------------------------------------------------- report grouping
@pytest.mark.parametrize(("key", "first", "second"), [
    ("benchmark", "MT10", "custom"),  # a custom benchmark with MT10's task list
    ("protocol", "mtrl", "metaworld-plus"),  # both protocols' runs below one folder
])
def test_runs_of_another_benchmark_or_protocol_are_not_pooled(tmp_path, key, first, second):
    """Same task list, same balancer and seed: two groups (pooled, the second run was
    dropped as a duplicate of the first and its group reported 1.0)."""
    write_run(tmp_path / "a" / "mean" / "seed0", "mean", 0, {10: [1.0] * 4}, **{key: first})
    write_run(tmp_path / "b" / "mean" / "seed0", "mean", 0, {10: [0.0] * 4}, **{key: second})
    report = write_report(tmp_path, reps=REPS, poi_reps=POI_REPS, plots=False)
    groups = {getattr(g, key): g for g in report.groups}
    assert set(groups) == {first, second}
    assert groups[first].methods["mean"].final_mean == 1.0
    assert groups[second].methods["mean"].final_mean == 0.0
    for g in report.groups:
        assert {getattr(r, key) for r in g.runs} == {getattr(g, key)}
    assert report.skipped == []


def test_final_score_without_final_eval_is_the_last_evaluation(tmp_path):
    """An older result.json without final_eval: the last logged evaluation is final."""
    for seed in range(2):
        write_run(tmp_path / "mean" / f"seed{seed}", "mean", seed,
                  {10: [0.0] * 4, 20: [1.0, 1.0, 0.0, 0.0]}, final_eval=False)
    (g,) = write_report(tmp_path, reps=REPS, poi_reps=POI_REPS, plots=False).groups
    assert g.methods["mean"].final_mean == 0.5


def _with_kwargs(run_dir: Path, kwargs: dict) -> None:
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "balancer_kwargs": kwargs}))


def test_methods_are_labelled_by_their_hyper_parameters_when_they_differ(tmp_path):
    """One balancer run with two settings: two methods, labelled with the setting. `c 1`
    and `c 1.0` (the CLI keeps integers since 2026-11-29; older runs saved 1.0) are the
    same setting: one method (they were two, each with one seed)."""
    for seed, c in enumerate([1, 1.0]):
        d = tmp_path / "same" / "cagrad" / f"seed{seed}"
        write_run(d, "cagrad", seed, {10: [float(seed)] * 4})
        _with_kwargs(d, {"c": c})
    (g,) = write_report(tmp_path / "same", reps=REPS, poi_reps=POI_REPS, plots=False).groups
    assert list(g.methods) == ["cagrad"] and g.methods["cagrad"].seeds == [0, 1]
    for seed, c in enumerate([0.5, 0.9]):
        d = tmp_path / "two" / "cagrad" / f"seed{seed}"
        write_run(d, "cagrad", 0, {10: [float(seed)] * 4})
        _with_kwargs(d, {"c": c})
    (g,) = write_report(tmp_path / "two", reps=REPS, poi_reps=POI_REPS, plots=False).groups
    assert sorted(g.methods) == ["cagrad(c=0.5)", "cagrad(c=0.9)"]
    assert g.methods["cagrad(c=0.9)"].final_mean == 1.0


def test_the_report_header_counts_add_up(tmp_path):
    """One unfinished run, one finished run whose final evaluation lacks a task, one good
    run: the header said "2 finished run(s); 2 run(s) not in the statistics" (2 + 2 ≠ 3)."""
    write_run(tmp_path / "mean" / "seed0", "mean", 0, {10: [1.0] * 4})
    write_run(tmp_path / "mean" / "seed1", "mean", 1, {10: [1.0] * 4}, finished=False)
    write_run(tmp_path / "mean" / "seed2", "mean", 2, {10: [1.0] * 4})
    result = json.loads((tmp_path / "mean" / "seed2" / "result.json").read_text())
    del result["final_eval"]["success"]["task-b"]
    (tmp_path / "mean" / "seed2" / "result.json").write_text(json.dumps(result))
    report = write_report(tmp_path, reps=REPS, poi_reps=POI_REPS, plots=False)
    header = (tmp_path / "summary.md").read_text().splitlines()[2]
    assert header == (f"3 run(s) under `{tmp_path.name}`, 2 finished; 2 not in the "
                      "statistics (1 unfinished), listed at the end.")
    assert report.groups[0].methods["mean"].seeds == [0]
