"""Report statistics and files, checked against values computed by hand on fixed run logs."""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from mtrl.report import (
    ReportError,
    best_over_time,
    interval_estimates,
    probability_of_improvement,
    read_jsonl,
    seed_mean_curve,
    standard_error,
    write_report,
)

TASKS = ["task-a", "task-b", "task-c", "task-d"]
REPS, POI_REPS = 300, 40


def write_run(
    run_dir: Path,
    balancer: str,
    seed: int,
    evals: dict[int, list[float]],
    protocol: str = "mtrl",
    finished: bool = True,
    stale: dict[int, list[float]] | None = None,
    wall_clock_s: float = 100.0,
    benchmark: str = "MT10",
    final_eval: bool = True,
) -> None:
    """A run directory as the trainer writes it (4 tasks, K=4 env steps per vector step).

    ``stale``: eval records logged after the last checkpoint of a session that crashed; the
    resumed session logs those steps again (``evals``), so the report must drop them.
    ``final_eval=False``: a result.json without it (written by older versions).
    """
    run_dir.mkdir(parents=True)
    config = {"env": {"benchmark": benchmark, "seed": seed}, "balancer": balancer,
              "balancer_kwargs": {}, "protocol": protocol, "task_names": TASKS}
    (run_dir / "config.json").write_text(json.dumps(config))

    def record(step: int, success: list[float]) -> dict:
        return {"step": step, "env_steps": 4 * step, "protocol": protocol,
                "episodes_per_task": 1, "mean_success": float(np.mean(success)),
                "success": dict(zip(TASKS, success, strict=True)),
                "return": {t: 10.0 * s + step for t, s in zip(TASKS, success, strict=True)}}

    lines = []
    steps = sorted(evals)
    for step in steps:
        if stale and step == min(stale):
            lines += [json.dumps(record(s, v)) for s, v in sorted(stale.items())]
        lines.append(json.dumps(record(step, evals[step])))
    lines.append('{"step": 99, "env_steps": 3')  # a line cut short by a crash
    (run_dir / "eval.jsonl").write_text("\n".join(lines) + "\n")
    metrics = []
    for step in steps:
        w = [0.25 + 0.01 * seed * (i - 1.5) for i in range(4)]
        metrics.append({"step": step, "env_steps": 4 * step, "env_steps_per_s": 50.0,
                        "critic/weights": w, "actor/weights": w,
                        "critic/conflict_fraction": 0.1 * seed,
                        "critic/mean_cosine": 0.5, "actor/conflict_fraction": float("nan")})
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in metrics) + "\n")
    (run_dir / "checkpoint.pt").write_bytes(b"not read by the report")
    if finished:
        last = max(steps)
        result = {"step": last, "env_steps": 4 * last, "wall_clock_s": wall_clock_s,
                  "env_steps_per_s": 4 * last / wall_clock_s}
        if final_eval:
            result["final_eval"] = record(last, evals[last])
        (run_dir / "result.json").write_text(json.dumps(result))


# Per-seed success vectors over TASKS at steps 10, 20, 30 (hand-computed below).
MEAN_RUNS = {
    0: {10: [1, 0, 0, 0], 20: [1, 1, 1, 0], 30: [1, 1, 0, 0]},  # .25 .75 .50
    1: {10: [1, 1, 0, 0], 20: [1, 1, 1, 1], 30: [1, 1, 1, 0]},  # .50 1.0 .75
    2: {10: [0, 1, 0, 0], 20: [1, 1, 0, 0], 30: [1, 0, 0, 0]},  # .25 .50 .25
}
CAGRAD_RUNS = {
    0: {10: [0, 0, 0, 0], 20: [1, 1, 1, 1], 30: [1, 1, 1, 0]},  # 0   1.0 .75
    1: {10: [1, 0, 0, 0], 20: [1, 1, 1, 0], 30: [1, 1, 1, 1]},  # .25 .75 1.0
}


@pytest.fixture
def mtrl_bench(tmp_path: Path) -> Path:
    root = tmp_path / "bench"
    for seed, evals in MEAN_RUNS.items():
        stale = {30: [0, 0, 0, 0]} if seed == 0 else None  # crashed after step 20's checkpoint
        write_run(root / "runs" / "mean" / f"seed{seed}", "mean", seed,
                  {k: [float(x) for x in v] for k, v in evals.items()}, stale=stale,
                  wall_clock_s=100.0 + 10 * seed)
    for seed, evals in CAGRAD_RUNS.items():
        write_run(root / "runs" / "cagrad" / f"seed{seed}", "cagrad", seed,
                  {k: [float(x) for x in v] for k, v in evals.items()}, wall_clock_s=4000.0)
    # An interrupted run: checkpoint, no result.json -> listed, not in the statistics.
    write_run(root / "runs" / "cagrad" / "seed2", "cagrad", 2, {10: [1.0, 1.0, 1.0, 1.0]},
              finished=False)
    return root


# ---------------------------------------------------------------------- statistics
def test_standard_error_by_hand():
    # std(ddof=1) of 1,2,3,4 is sqrt(5/3); / sqrt(4)
    assert standard_error([1, 2, 3, 4]) == pytest.approx(math.sqrt(5 / 3) / 2)
    assert standard_error([0.5, 0.75, 0.25]) == pytest.approx(0.25 / math.sqrt(3))
    assert math.isnan(standard_error([0.7]))


def test_seed_mean_curve_and_best_over_time():
    curve = seed_mean_curve([{10: 0.25, 20: 0.75, 30: 0.5}, {10: 0.5, 20: 1.0, 30: 0.75},
                             {10: 0.25, 20: 0.5, 30: 0.25, 40: 1.0}])
    assert curve.steps.tolist() == [10, 20, 30, 40]
    np.testing.assert_allclose(curve.mean, [1 / 3, 0.75, 0.5, 1.0])
    assert curve.count.tolist() == [3, 3, 3, 1]
    value, step, se = best_over_time(curve)
    # step 40 was reached by one seed only, so it cannot be the best-over-time point
    assert (value, step) == (pytest.approx(0.75), 20)
    assert se == pytest.approx(0.25 / math.sqrt(3))


def test_iqm_and_mean_of_a_known_matrix_with_bracketing_cis():
    # sorted: 0 .1 .2 .3 .4 .5 .8 .9 -> IQM drops 2 at each end: mean(.2,.3,.4,.5) = .35
    scores = {"x": np.array([[0.0, 0.1, 0.2, 0.3], [0.4, 0.5, 0.8, 0.9]]),
              "y": np.full((3, 4), 0.6)}
    est = interval_estimates(scores, reps=REPS)
    assert est["x"]["mean"][0] == pytest.approx(0.4)
    assert est["x"]["iqm"][0] == pytest.approx(0.35)
    for name in scores:
        for kind in ("mean", "iqm"):
            point, low, high = est[name][kind]
            assert low <= point + 1e-12 and point <= high + 1e-12, (name, kind, est[name])
    assert est["y"]["iqm"] == pytest.approx((0.6, 0.6, 0.6))


def test_probability_of_improvement_of_separated_scores():
    rng = np.random.default_rng(0)
    good, bad = 0.9 + 0.05 * rng.random((5, 4)), 0.1 * rng.random((5, 4))
    poi = probability_of_improvement({"bad": bad, "good": good}, reps=POI_REPS)
    assert poi[("good", "bad")][0] == pytest.approx(1.0)
    assert poi[("bad", "good")][0] == pytest.approx(0.0)
    assert poi[("good", "bad")][1] >= 0.99  # lower CI bound
    tie = probability_of_improvement({"a": np.full((3, 4), 0.5), "b": np.full((3, 4), 0.5)},
                                     reps=POI_REPS)
    assert tie[("a", "b")][0] == pytest.approx(0.5)


def test_intervals_are_reproducible_and_leave_numpys_global_state_alone():
    """rliable's bootstraps draw from np.random, not from the random_state passed: the
    CIs changed on every report (e.g. [0.452, 0.584] then [0.452, 0.586])."""
    rng = np.random.default_rng(1)
    scores = {"a": rng.random((5, 6)), "b": rng.random((5, 6)), "c": rng.random((5, 6))}
    np.random.seed(123)
    before = np.random.get_state()[1].copy()  # the state right after seeding
    runs = [(interval_estimates(scores, reps=REPS, seed=s),
             probability_of_improvement(scores, reps=POI_REPS, seed=s)) for s in (0, 0, 1)]
    np.random.seed(999)  # another global state in between: same result
    runs.append((interval_estimates(scores, reps=REPS), probability_of_improvement(
        scores, reps=POI_REPS)))
    assert runs[0] == runs[1] == runs[3]
    assert runs[2] != runs[0]  # the seed matters
    np.random.seed(123)
    interval_estimates(scores, reps=REPS)
    assert np.array_equal(np.random.get_state()[1], before)  # not consumed


def test_read_jsonl_keeps_one_history_after_resume(tmp_path):
    p = tmp_path / "eval.jsonl"
    p.write_text("\n".join([
        '{"step": 10, "v": 1}', '{"step": 20, "v": 2}', '{"step": 30, "v": "stale"}',
        '{"step": 30, "v": 3}', '{"step": 40, "v": 4}', '{"step": 50, "v"',
    ]) + "\n")
    assert [(r["step"], r["v"]) for r in read_jsonl(p)] == [(10, 1), (20, 2), (30, 3), (40, 4)]
    p.write_text('{"step": 10}\n{"step": 20}\n{"step": 30}\n{"step": 20}\n{"step": 30}\n')
    assert [r["step"] for r in read_jsonl(p)] == [10, 20, 30]


# ---------------------------------------------------------------------- report files
def parse_table(md: str, first_header: str) -> list[dict[str, str]]:
    lines = md.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")),
                             strict=True)))
    return rows


def numbers(cell: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+\.\d+|-?\d+", cell.replace(",", ""))]


def test_mtrl_protocol_report(mtrl_bench):
    report = write_report(mtrl_bench, reps=REPS, poi_reps=POI_REPS)
    names = {p.name for p in report.files}
    for expected in ("results.csv", "summary.md", "summary.json", "learning_curves_mt10_mtrl.png",
                     "task_heatmap_mt10_mtrl.png", "diagnostics_weights_mt10_mtrl.png",
                     "diagnostics_conflict_mt10_mtrl.png"):
        assert expected in names
        path = mtrl_bench / expected
        assert path.is_file() and path.stat().st_size > 0
    assert (mtrl_bench / "learning_curves_mt10_mtrl.png").read_bytes()[:4] == b"\x89PNG"

    # results.csv: one row per finished run x evaluation x task, stale records dropped.
    with open(mtrl_bench / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["balancer", "seed", "step", "env_steps", "task", "success",
                             "return", "protocol", "benchmark"]
    assert len(rows) == (3 + 2) * 3 * 4
    assert {r["protocol"] for r in rows} == {"mtrl"}
    mean0_final = {r["task"]: float(r["success"]) for r in rows
                   if r["balancer"] == "mean" and r["seed"] == "0" and r["step"] == "30"}
    assert mean0_final == {"task-a": 1.0, "task-b": 1.0, "task-c": 0.0, "task-d": 0.0}
    row = next(r for r in rows if r["balancer"] == "cagrad" and r["seed"] == "1"
               and r["step"] == "20" and r["task"] == "task-d")
    assert (float(row["success"]), float(row["return"]), row["env_steps"]) == (0.0, 20.0, "80")

    md = (mtrl_bench / "summary.md").read_text()
    table = {r["balancer"]: r for r in parse_table(md, "balancer")}
    assert list(table) == ["mean", "cagrad"]  # the baseline first
    # mean: finals .5 .75 .25 -> 0.5 ± 0.25/sqrt(3); curve .333 .75 .5 -> best .75 at 20
    m = table["mean"]
    assert m["seeds"] == "3"
    assert numbers(m["final success (mean ± s.e.)"]) == [0.5, 0.144]
    assert numbers(m["best over time ± s.e. (optimistic)"]) == [0.75, 0.144]
    assert m["at step"] == "20"
    assert numbers(m["IQM [95% CI]"])[0] == 0.5  # six 0s and six 1s
    assert m["wall-clock"] == "0:01:50"  # mean of 100, 110, 120 s
    assert m["env steps"] == "120"
    # cagrad: finals .75 1.0 -> .875 ± .125; curve .125 .875 .875 -> best .875 first at 20
    c = table["cagrad"]
    assert c["seeds"] == "2"
    assert numbers(c["final success (mean ± s.e.)"]) == [0.875, 0.125]
    assert numbers(c["best over time ± s.e. (optimistic)"]) == [0.875, 0.125]
    assert c["at step"] == "20"
    assert c["wall-clock"] == "1:06:40"
    for r in table.values():  # CI bounds bracket the point estimate
        for col in ("mean [95% CI]", "IQM [95% CI]"):
            point, low, high = numbers(r[col])
            assert low <= point <= high
    assert "optimistic" in md and "Probability of improvement" not in md  # mtrl protocol
    assert ("Headline numbers for this protocol: **final success ± s.e.** and **best over "
            "time**.") in md and "**mean and IQM with 95% CIs**" not in md

    per_task = {r["task"]: r for r in parse_table(md, "task")}
    assert numbers(per_task["task-c"]["mean"]) == [0.333]
    assert numbers(per_task["task-d"]["cagrad"]) == [0.5]
    # the interrupted run is listed, not counted
    assert "Runs not in the statistics" in md and "seed2" in md and "resume it" in md

    summary = json.loads((mtrl_bench / "summary.json").read_text())
    (group,) = summary["groups"]
    assert group["protocol"] == "mtrl" and group["tasks"] == TASKS
    assert group["methods"]["mean"]["final_se"] == pytest.approx(0.25 / math.sqrt(3))
    assert group["methods"]["mean"]["curve"]["mean"] == pytest.approx([1 / 3, 0.75, 0.5])
    assert group["methods"]["cagrad"]["seeds"] == [0, 1]
    assert len(summary["runs_not_in_statistics"]) == 1


def test_metaworld_plus_report_has_iqm_cis_and_probability_of_improvement(tmp_path):
    root = tmp_path / "mwp"
    mean_final = [[0.0, 0.1, 0.2, 0.3], [0.4, 0.5, 0.8, 0.9]]
    for seed, final in enumerate(mean_final):
        write_run(root / "runs" / "mean" / f"seed{seed}", "mean", seed,
                  {100: [0.0] * 4, 200: final}, protocol="metaworld-plus")
    for seed in range(2):
        write_run(root / "runs" / "fairgrad" / f"seed{seed}", "fairgrad", seed,
                  {100: [0.5] * 4, 200: [1.0] * 4}, protocol="metaworld-plus")
    write_report(root, reps=REPS, poi_reps=POI_REPS, plots=False)
    md = (root / "summary.md").read_text()
    assert "`metaworld-plus` protocol" in md
    assert ("Headline numbers for this protocol: **mean and IQM with 95% CIs** and the "
            "probability of improvement below.") in md and "**best over time**." not in md
    table = {r["balancer"]: r for r in parse_table(md, "balancer")}
    mean_point, low, high = numbers(table["mean"]["mean [95% CI]"])
    assert mean_point == 0.4 and low <= 0.4 <= high
    iqm_point, low, high = numbers(table["mean"]["IQM [95% CI]"])
    assert iqm_point == 0.35 and low <= 0.35 <= high
    assert numbers(table["fairgrad"]["IQM [95% CI]"]) == [1.0, 1.0, 1.0]
    poi = {r[""]: r for r in parse_table(md, "")}
    assert numbers(poi["fairgrad"]["mean"]) == [1.0]
    assert numbers(poi["mean"]["fairgrad"]) == [0.0]
    assert "P(mean > fairgrad) = 0.000 [0.000, 0.000]" in md
    summary = json.loads((root / "summary.json").read_text())
    assert summary["groups"][0]["probability_of_improvement"]["fairgrad > mean"]["point"] == 1.0
    assert not list(root.glob("*.png"))


def test_report_cli(mtrl_bench, capsys):
    from mtrl.cli import main

    main(["report", str(mtrl_bench), "--reps", "100", "--no-plots"])
    out = capsys.readouterr().out
    assert "# Benchmark report" in out and "wrote" in out
    with pytest.raises(SystemExit) as exc:
        main(["report", str(mtrl_bench / "runs" / "nope")])
    assert exc.value.code == 2
    assert "is not a directory" in capsys.readouterr().err


def test_report_without_runs_is_a_clear_error(tmp_path):
    with pytest.raises(ReportError, match="no run directories"):
        write_report(tmp_path)


def test_runs_are_grouped_by_task_list_and_duplicates_and_gaps_are_left_out(tmp_path):
    root = tmp_path / "mixed"
    for seed in range(2):
        write_run(root / "a" / "mean" / f"seed{seed}", "mean", seed, {10: [1.0, 1.0, 0.0, 0.0]})
        # the same (balancer, seed) in another experiment folder: not counted twice
        write_run(root / "b" / "mean" / f"seed{seed}", "mean", seed, {10: [0.0] * 4})
    # a run on another task list (its config names other tasks): its own group
    other = root / "c" / "mean" / "seed0"
    write_run(other, "mean", 0, {10: [1.0] * 4})
    config = json.loads((other / "config.json").read_text())
    config["task_names"] = ["w", "x", "y", "z"]
    (other / "config.json").write_text(json.dumps(config))
    for name in ("eval.jsonl", "result.json"):
        text = (other / name).read_text()
        for old, new in zip(TASKS, ["w", "x", "y", "z"], strict=True):
            text = text.replace(old, new)
        (other / name).write_text(text)
    # a final evaluation without a number for one task (null): listed, not counted
    gap = root / "d" / "cagrad" / "seed0"
    write_run(gap, "cagrad", 0, {10: [1.0, math.nan, 1.0, 1.0]})
    for name in ("eval.jsonl", "result.json"):
        (gap / name).write_text((gap / name).read_text().replace("NaN", "null"))
    report = write_report(root, reps=REPS, poi_reps=POI_REPS, plots=False)
    by_tasks = {tuple(g.tasks): g for g in report.groups}
    assert set(by_tasks) == {tuple(TASKS), ("w", "x", "y", "z")}
    g = by_tasks[tuple(TASKS)]
    assert list(g.methods) == ["mean"] and g.methods["mean"].seeds == [0, 1]
    assert g.methods["mean"].final_mean == 0.5  # folder a's runs, not a + b
    why = {str(r.path.relative_to(root)): reason for r, reason in report.skipped}
    assert why["b/mean/seed0"].startswith("same balancer and seed as a/mean/seed0")
    assert why["d/cagrad/seed0"] == "final evaluation has no success value for task(s) task-b"
    assert len({g.slug for g in report.groups}) == 2  # plot files do not collide
    md = (root / "summary.md").read_text()
    assert "(4 tasks: w, x, y, z)" in md


def test_single_seed_has_no_interval_and_mixed_runs_are_flagged(tmp_path):
    root = tmp_path / "one"
    write_run(root / "mean" / "seed0", "mean", 0, {100: [0.0] * 4, 200: [0.5] * 4},
              protocol="metaworld-plus")
    write_run(root / "fairgrad" / "seed0", "fairgrad", 0, {100: [1.0] * 4},
              protocol="metaworld-plus")
    report = write_report(root, reps=REPS, poi_reps=POI_REPS, plots=False)
    (g,) = report.groups
    m = g.methods["mean"]
    assert m.mean_ci[0] == 0.5 and math.isnan(m.mean_ci[1]) and math.isnan(m.iqm_ci[2])
    p, low, high = g.poi[("fairgrad", "mean")]
    assert p == 1.0 and math.isnan(low) and math.isnan(high)
    assert any("final evaluations at different steps" in w for w in g.warnings)
    md = (root / "summary.md").read_text()
    assert "0.500 [n/a, n/a]" in md and "**Note:** final evaluations at different steps" in md
    assert "1 episode(s) per task per evaluation" in md  # from the records, not a constant


def test_runs_trained_on_different_episodes_are_flagged(tmp_path):
    root = tmp_path / "envs"
    for balancer, seed, steps, goals in (("mean", 0, 500, "random"), ("mean", 1, 500, "random"),
                                         ("cagrad", 0, 150, "fixed")):
        run = root / balancer / f"seed{seed}"
        write_run(run, balancer, seed, {10: [1.0] * 4}, protocol="metaworld-plus")
        config = json.loads((run / "config.json").read_text())
        config["env"].update(max_episode_steps=steps, goal_mode=goals)
        (run / "config.json").write_text(json.dumps(config))
    (g,) = write_report(root, reps=REPS, poi_reps=POI_REPS, plots=False).groups
    assert g.warnings == ["runs trained on different episodes are pooled "
                          "(150 steps / fixed goals, 500 steps / random goals)"]
    config = json.loads((root / "cagrad" / "seed0" / "config.json").read_text())
    config["env"].update(max_episode_steps=500, goal_mode="random")
    (root / "cagrad" / "seed0" / "config.json").write_text(json.dumps(config))
    for name in ("summary.md", "summary.json", "results.csv"):
        (root / name).unlink(missing_ok=True)
    (g,) = write_report(root, reps=REPS, poi_reps=POI_REPS, plots=False).groups
    assert g.warnings == []


def test_an_extended_run_with_an_old_result_is_unfinished(tmp_path):
    root = tmp_path / "ext"
    write_run(root / "mean" / "seed0", "mean", 0, {10: [1.0] * 4})
    config_path = root / "mean" / "seed0" / "config.json"
    config = json.loads(config_path.read_text())
    config["total_steps"] = 1000  # result.json says step 10
    config_path.write_text(json.dumps(config))
    write_run(root / "mean" / "seed1", "mean", 1, {10: [0.0] * 4})
    report = write_report(root, reps=REPS, poi_reps=POI_REPS, plots=False)
    assert report.groups[0].methods["mean"].seeds == [1]
    # (the reason said "no checkpoint, no result.json")
    assert [(r.seed, why) for r, why in report.skipped] == [
        (0, "result.json at step 10 < total_steps 1000: extended, not finished (resume it)")]


@pytest.mark.parametrize("damage", ["null", "absent"])
def test_an_evaluation_missing_a_tasks_value_does_not_count_for_that_seed(tmp_path, damage):
    """Seed 0 lacks task-b's value at step 10 (a damaged log): its mean there came out NaN,
    was dropped by the seed average while the seed still counted as having reached step
    10, and best-over-time took seed 1's 1.0 alone as a 2-seed value. With the key
    absent, the mean was taken over the 3 other tasks."""
    root = tmp_path / "gap"
    write_run(root / "mean" / "seed0", "mean", 0, {10: [0.0, 0.0, 0.0, 0.0],
                                                    20: [0.0, 0.0, 0.0, 0.0]})
    write_run(root / "mean" / "seed1", "mean", 1, {10: [1.0] * 4, 20: [1.0, 1.0, 0.0, 0.0]})
    log = root / "mean" / "seed0" / "eval.jsonl"
    lines = log.read_text().splitlines()
    first = json.loads(lines[0])
    if damage == "null":
        first["success"]["task-b"] = None
    else:
        del first["success"]["task-b"]
    log.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    (g,) = write_report(root, reps=REPS, poi_reps=POI_REPS, plots=False).groups
    m = g.methods["mean"]
    assert list(m.curve.count) == [1, 2]  # step 10: seed 1 only
    assert (m.best, m.best_step) == (0.25, 20)  # the only step both seeds reached


def test_runs_without_a_task_list_are_left_out_and_the_csv_has_no_duplicates(tmp_path):
    root = tmp_path / "r"
    write_run(root / "a" / "mean" / "seed0", "mean", 0, {10: [1.0] * 4})
    write_run(root / "b" / "mean" / "seed0", "mean", 0, {10: [0.0] * 4})  # duplicate seed
    bare = root / "c" / "cagrad" / "seed0"  # an old run: no task_names, no logs, a result
    write_run(bare, "cagrad", 0, {10: [1.0] * 4})
    config = json.loads((bare / "config.json").read_text())
    del config["task_names"]
    (bare / "config.json").write_text(json.dumps(config))
    (bare / "eval.jsonl").unlink()
    result = json.loads((bare / "result.json").read_text())
    result["final_eval"] = None
    (bare / "result.json").write_text(json.dumps(result))
    report = write_report(root, reps=REPS, poi_reps=POI_REPS, plots=False)
    assert [len(g.tasks) for g in report.groups] == [4]
    assert report.groups[0].tag == ""  # the left-out run does not make a second group
    why = {str(r.path.relative_to(root)): reason for r, reason in report.skipped}
    assert why["c/cagrad/seed0"].startswith("no task list")
    with open(root / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["success"] for r in rows} == {"1.0"}  # a's rows only


@pytest.mark.parametrize("last_step", [150_000, 5_000_000])
def test_step_axes_stay_readable_on_long_runs(tmp_path, monkeypatch, last_step):
    """Env-step ticks of a long run (here up to 0.6M and 20M env steps) in short units that
    do not run into each other on the narrow diagnostics panels (full numbers did)."""
    import mtrl.report as report

    root = tmp_path / "bench"
    steps = np.linspace(last_step / 10, last_step, 10).astype(int)
    for name in ("mean", "cagrad", "fairgrad", "sdmgrad-os"):
        write_run(root / name / "seed0", name, 0, {int(s): [1, 0, 0, 0] for s in steps})
    figures = []
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.append(fig))
    write_report(root, reps=REPS, poi_reps=POI_REPS)
    step_axes = [ax for fig in figures for ax in fig.axes if ax.get_lines()
                 and any("steps" in a.get_xlabel() for a in fig.axes)]
    assert len(step_axes) == 1 + 2 * 4 + 2  # learning curves, 2 x 4 weights, 2 critic conflict
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    for fig in figures:
        FigureCanvasAgg(fig).draw()  # as _save renders them
    for ax in step_axes:
        lo, hi = ax.get_xlim()
        labels = [t for t in ax.get_xticklabels()
                  if t.get_visible() and t.get_text() and lo <= t.get_position()[0] <= hi]
        texts = [t.get_text() for t in labels]
        assert 3 <= len(labels) <= 7, texts
        assert all(len(x) <= 5 and x[-1] in "0kM" for x in texts), texts
        boxes = sorted((t.get_window_extent() for t in labels), key=lambda b: b.x0)
        gaps = [b.x0 - a.x1 for a, b in itertools.pairwise(boxes)]
        assert min(gaps) >= 8, (texts, gaps)  # pixels: a character apart at least (was 3)
