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


def test_a_methods_intervals_do_not_move_when_another_method_is_added():
    """Each method (and pair) bootstraps on its own stream: with one shared stream, adding
    a method sorted before cagrad moved cagrad's mean CI (0.647-0.753 -> 0.650-0.752 in
    the audit's example) with the same data."""
    rng = np.random.default_rng(5)
    scores = {"cagrad": rng.random((5, 4)), "mean": rng.random((5, 4))}
    more = {"aaa": rng.random((5, 4)), **scores}
    alone, together = interval_estimates(scores, reps=500), interval_estimates(more, reps=500)
    for name in scores:
        assert together[name] == alone[name], name
    poi, poi_more = (probability_of_improvement(s, reps=100) for s in (scores, more))
    assert poi_more[("cagrad", "mean")] == poi[("cagrad", "mean")]
    # still a seeded, reproducible draw, and another seed draws differently
    assert interval_estimates(scores, reps=500) == alone
    assert interval_estimates(scores, reps=500, seed=1)["cagrad"] != alone["cagrad"]


def test_a_methods_intervals_do_not_move_when_another_setting_of_it_joins(tmp_path):
    """The label of cagrad (c=0.9) becomes "cagrad(c=0.9)" once runs with c=0.5 are in the
    folder; its stream was seeded by that label, so its intervals moved with the same runs
    (the audit's example: IQM high 0.692025 -> 0.692)."""
    rng = np.random.default_rng(3)
    root = tmp_path / "mwp"

    def add(balancer: str, folder: str, seed: int, kwargs: dict) -> None:
        d = root / folder / f"seed{seed}"
        write_run(d, balancer, seed, {10: [0.0] * 4, 20: list(rng.random(4))},
                  protocol="metaworld-plus")
        _with_kwargs(d, kwargs)

    for seed in range(4):
        add("cagrad", "cagrad09", seed, {"c": 0.9})
        add("mean", "mean", seed, {})
    first = write_report(root, reps=REPS, poi_reps=POI_REPS, plots=False).groups[0]
    before = first.methods
    for seed in range(3):
        add("cagrad", "cagrad05", seed, {"c": 0.5})
    after = write_report(root, reps=REPS, poi_reps=POI_REPS, plots=False).groups[0]
    assert sorted(after.methods) == ["cagrad(c=0.5)", "cagrad(c=0.9)", "mean"]
    moved = after.methods["cagrad(c=0.9)"]
    assert (moved.mean_ci, moved.iqm_ci) == (before["cagrad"].mean_ci, before["cagrad"].iqm_ci)
    assert (after.methods["mean"].mean_ci, after.methods["mean"].iqm_ci) == (
        before["mean"].mean_ci, before["mean"].iqm_ci)
    assert after.poi[("cagrad(c=0.9)", "mean")] == first.poi[("cagrad", "mean")]


def _set(run_dir: Path, **changes) -> None:
    """Change (dotted) keys of a run's config.json."""
    config = json.loads((run_dir / "config.json").read_text())
    for key, value in changes.items():
        *parents, last = key.split("__")
        d = config
        for p in parents:
            d = d.setdefault(p, {})
        d[last] = value
    (run_dir / "config.json").write_text(json.dumps(config))


def test_runs_trained_with_different_settings_are_noted(tmp_path):
    """Pooled seeds of one method with other network sizes, and two methods trained with
    other learning rates, were reported side by side without a word. By design a method's
    own settings (its hyper-parameters, the losses it balances), the seed, the run
    intervals and whole-number floats written as 1.0 or 1 raise no note."""
    root = tmp_path / "bench"
    for balancer in ("mean", "famo"):
        for seed in range(3):
            d = root / balancer / f"seed{seed}"
            write_run(d, balancer, seed, {10: [float(seed % 2)] * 4})
            _set(d, sac__hidden_sizes=[400, 400], sac__actor_lr=0.0003, batch_size=1280,
                 eval_every=10 * (seed + 1), sac__tau=1.0 if seed else 1)
    for seed in range(3):
        _set(root / "famo" / f"seed{seed}", sac__balance=["critic"])
    (g,) = write_report(root, reps=REPS, poi_reps=POI_REPS, plots=False).groups
    assert g.warnings == []
    _set(root / "mean" / "seed1", sac__hidden_sizes=[16, 16])
    for seed in range(3):
        _set(root / "famo" / f"seed{seed}", sac__actor_lr=0.001)
    (g,) = write_report(root, reps=REPS, poi_reps=POI_REPS, plots=False).groups
    assert g.warnings == [
        "runs of mean with different settings are pooled: sac.hidden_sizes [16, 16] "
        "(seed 1) vs [400, 400] (seeds 0, 2)",
        "methods trained with different settings are compared: sac.actor_lr 0.0003 (mean) "
        "vs 0.001 (famo)",
    ]
    assert "**Note:** runs of mean with different settings are pooled" in (
        root / "summary.md").read_text()


@pytest.mark.parametrize(("where", "edit", "listed"), [
    ("eval.jsonl", {"step": None}, False),
    ("eval.jsonl", {"step": "20"}, False),
    ("eval.jsonl", {"success": None}, False),
    ("eval.jsonl", {"success": [1, 2]}, False),
    ("eval.jsonl", {"return": None}, False),
    ("eval.jsonl", {"env_steps": None}, False),
    ("metrics.jsonl", {"critic/weights": "abc", "env_steps": None}, False),
    ("config.json", {"env": "MT10"}, "config.json: env is not a section"),
    ("config.json", {"env": {"benchmark": "MT10", "seed": None}},
     "config.json: env.seed None is not an integer"),
    ("config.json", {"balancer_kwargs": [1]}, "config.json: balancer_kwargs is not a section"),
    ("result.json", {"final_eval": {"step": 30, "success": None}},
     "final evaluation has no success value for task(s) task-a, task-b, task-c, task-d"),
])
def test_damaged_fields_are_left_out_or_listed_not_a_traceback(tmp_path, where, edit, listed):
    """Records and configs that parse as JSON but hold the wrong types (hand-edited or
    damaged files) raised TypeError/AttributeError from the report. A damaged evaluation
    or metrics record is left out; a damaged config or final evaluation puts the run under
    "Runs not in the statistics" with the reason."""
    for seed in range(2):
        write_run(tmp_path / "mean" / f"seed{seed}", "mean", seed,
                  {10: [0.0] * 4, 20: [0.5] * 4, 30: [1.0] * 4})
    path = tmp_path / "mean" / "seed1" / where
    if where.endswith(".jsonl"):
        lines = path.read_text().splitlines()
        lines[1] = json.dumps({**json.loads(lines[1]), **edit})  # a middle record
        path.write_text("\n".join(lines) + "\n")
    else:
        path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    report = write_report(tmp_path, reps=REPS, poi_reps=POI_REPS, plots=True)
    (g,) = report.groups
    if listed:
        assert g.methods["mean"].seeds == [0]
        assert [why for _, why in report.skipped] == [listed]
        assert listed in (tmp_path / "summary.md").read_text()
    else:
        assert g.methods["mean"].seeds == [0, 1] and report.skipped == []
        assert g.methods["mean"].final_mean == 1.0


def test_a_run_whose_config_json_does_not_parse_is_listed(tmp_path):
    """`{x` in a run's config.json: the run vanished from the report ("1 run(s)"), and
    with no other run the report said there were no run directories."""
    for seed in range(2):
        write_run(tmp_path / "mean" / f"seed{seed}", "mean", seed, {10: [1.0] * 4})
    (tmp_path / "mean" / "seed1" / "config.json").write_text("{x")
    report = write_report(tmp_path, reps=REPS, poi_reps=POI_REPS, plots=False)
    assert report.groups[0].methods["mean"].seeds == [0]
    assert [(r.path.name, why) for r, why in report.skipped] == [
        ("seed1", "config.json cannot be read (not a JSON object)")]
    assert (tmp_path / "summary.md").read_text().splitlines()[2].startswith("2 run(s)")
    # its seed is unknown, not 0 (the default seed made it look like a second seed 0)
    assert report.skipped[0][0].seed is None
    assert "| mean/seed1 | ? | ? |" in (tmp_path / "summary.md").read_text()
    (tmp_path / "other").mkdir()  # a config.json of something else: not a run, ignored
    (tmp_path / "other" / "config.json").write_text("{x")
    assert len(write_report(tmp_path, reps=REPS, poi_reps=POI_REPS, plots=False).skipped) == 1


def test_a_result_json_of_binary_garbage_is_listed_not_a_crash(tmp_path):
    """Bytes that are not UTF-8 in result.json (a damaged disk, a copy gone wrong) made
    the report raise UnicodeDecodeError; the run is listed as unfinished like a cut file."""
    for seed in range(2):
        write_run(tmp_path / "mean" / f"seed{seed}", "mean", seed, {10: [1.0] * 4})
    (tmp_path / "mean" / "seed1" / "result.json").write_bytes(b"\xff\xfe\x00garbage")
    report = write_report(tmp_path, reps=REPS, poi_reps=POI_REPS, plots=False)
    assert report.groups[0].methods["mean"].seeds == [0]
    assert [why for _, why in report.skipped] == [
        "result.json cannot be read (resume it: the run writes it again)"]
