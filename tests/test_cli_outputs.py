"""CLI outputs: the per-task success table, the out-of-memory guard's scope, a broken
plug-in in ``mtrl balancers``, ``mtrl eval --out`` on a missing run, ``mtrl bench``'s
report error and default ``--out``, and ``mtrl report``'s plots and bootstrap options.

Expensive work (training, evaluating, benchmarking) is replaced by stubs; only the
report test writes a real (small) report.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cli import run_cli
from test_plugins import install_plugin
from test_report import CAGRAD_RUNS, MEAN_RUNS, write_run

import mtrl.bench
import mtrl.cli
import mtrl.evaluate_run
import mtrl.report
from mtrl.balancers import names

# ---------------------------------------------------------------------- success table
RECORD = {
    "step": 30, "env_steps": 120, "protocol": "mtrl", "episodes_per_task": 4,
    "mean_success": 0.375,
    "success": {"reach-v3": 0.5, "pick-place-v3": 0.25},
    "return": {"reach-v3": 123.4, "pick-place-v3": 7.0},
}


def test_eval_prints_success_then_return_per_task_and_the_records_mean(tmp_path, capsys,
                                                                      monkeypatch):
    """The table printed by `mtrl eval`: success column, then return, mean = mean_success."""
    written = [tmp_path / "eval_30.json", tmp_path / "eval_30.csv"]
    calls = []

    def evaluate_run(path, **kwargs):
        calls.append((path, kwargs))
        return RECORD, written

    monkeypatch.setattr(mtrl.evaluate_run, "evaluate_run", evaluate_run)
    code, out, err = run_cli(["eval", str(tmp_path), "--no-progress"], capsys)
    assert code == 0, err
    assert len(calls) == 1
    lines = out.splitlines()
    assert lines[0] == ""
    assert lines[1:5] == [
        "task             success     return",
        "reach-v3            0.50      123.4",
        "pick-place-v3       0.25        7.0",
        "mean               0.375   (mtrl protocol, 4 episode(s)/task, step 30)",
    ]
    assert lines[5:] == [f"wrote {p}" for p in written]


# ---------------------------------------------------------------------- out-of-memory guard
def test_a_runtime_error_that_is_not_out_of_memory_is_not_reported_as_one(capsys, monkeypatch):
    """Only an out-of-memory RuntimeError becomes the one-line OOM message; others propagate."""

    def out_of_bounds(argv):
        raise RuntimeError("index 7 is out of bounds for dimension 0 with size 4")

    monkeypatch.setitem(mtrl.cli.COMMANDS, "eval", out_of_bounds)
    with pytest.raises(RuntimeError, match="index 7 is out of bounds"):
        mtrl.cli.main(["eval", "somewhere"])
    _, err = capsys.readouterr()
    assert "out of memory" not in err

    def oom(argv):  # the positive case: torch's CPU allocator running out
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 80000000000 bytes.")

    monkeypatch.setitem(mtrl.cli.COMMANDS, "eval", oom)
    code, _, err = run_cli(["eval", "somewhere"], capsys)
    assert code == 1
    assert err.startswith("error: out of memory: [enforce fail at alloc_cpu.cpp:117]")
    assert len(err.strip().splitlines()) == 1
    # the advice names the command's own options (eval has no --batch-size)
    assert err.rstrip().endswith("(a smaller --episodes-per-task needs less)")


# ---------------------------------------------------------------------- balancers
def test_balancers_lists_a_broken_plugin_as_failed_to_load_and_exits_0(tmp_path, capsys,
                                                                      monkeypatch):
    """`mtrl balancers` with a plug-in whose module raises ImportError: listed, exit 0."""
    module = install_plugin(
        tmp_path, monkeypatch,
        source="raise ImportError('missing dependency')\n",
        entry_points={"exploding": "{module}:Thing"},
    )
    code, out, err = run_cli(["balancers"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert (f"exploding      (failed to load: balancer plug-in 'exploding' (entry point "
            f"'{module}:Thing') failed to load: ImportError: missing dependency)") in lines
    # the built-ins are still listed, with their defaults
    assert "cagrad         (c=0.9)" in out
    assert [line.split()[0] for line in lines if line.strip()] == names()


# ---------------------------------------------------------------------- eval --out
def test_eval_of_a_missing_run_leaves_no_out_directory(tmp_path, capsys):
    """`mtrl eval /no/such/run --out D` fails (exit 2) without creating D."""
    out_dir = tmp_path / "evals" / "here"
    code, _, err = run_cli(["eval", "/no/such/run", "--out", str(out_dir)], capsys)
    assert code == 2 and "neither a run directory nor a checkpoint file" in err
    assert not out_dir.exists() and not (tmp_path / "evals").exists()


def test_empty_run_paths_are_refused(tmp_path, capsys, monkeypatch):
    """`--run-dir ''` trained into the default directory (and ' ' made a directory named
    a space); `mtrl eval ""` evaluated the working directory."""
    monkeypatch.chdir(tmp_path)
    for value in ("", " "):
        code, _, err = run_cli(["train", "--env.benchmark", "toy", "--run-dir", value],
                               capsys)
        assert (code, err) == (2, "error: --run-dir was given an empty value\n")
    code, _, err = run_cli(["eval", ""], capsys)
    assert (code, err) == (2, "error: PATH was given an empty value\n")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- bench
def test_bench_exits_1_when_the_report_was_not_written(tmp_path, capsys, monkeypatch):
    """A bench whose runs succeeded but whose report failed exits 1 naming the error."""
    specs = []

    def run_bench(spec, progress=True):
        specs.append(spec)
        outcome = {"balancer": "mean", "seed": 0, "action": "started", "status": "done",
                   "run_dir": str(tmp_path / "runs" / "mean" / "seed0")}
        return mtrl.bench.BenchResult(tmp_path, [outcome], report_error="disk on fire")

    monkeypatch.setattr(mtrl.bench, "run_bench", run_bench)
    code, out, err = run_cli(["bench", "--benchmark", "toy", "--balancers", "mean",
                              "--seeds", "1", "--steps", "5", "--out", str(tmp_path),
                              "--no-progress"], capsys)
    assert len(specs) == 1
    assert code == 1
    assert err.strip().splitlines()[-1] == "error: report not written: disk on fire"
    assert "bench: 1 run(s): 1 done" in out


def test_bench_default_out_is_benchmarks_benchmark_protocol(tmp_path, capsys, monkeypatch):
    """Without --out, `mtrl bench` writes to benchmarks/<benchmark, lower case>-<protocol>."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["bench", "--benchmark", "MT10", "--balancers", "mean",
                              "--seeds", "1", "--steps", "5", "--protocol", "metaworld-plus",
                              "--dry-run"], capsys)
    assert code == 0, err
    expected = tmp_path.resolve() / "benchmarks" / "mt10-metaworld-plus" / "runs" / "mean"
    assert out.splitlines()[0].split() == ["start", str(expected / "seed0")]
    assert list(tmp_path.iterdir()) == []  # a dry run creates nothing
    # and the spec handed to the bench itself
    specs = []
    monkeypatch.setattr(mtrl.bench, "run_bench", lambda spec, progress=True: specs.append(spec)
                        or mtrl.bench.BenchResult(Path(spec.out), []))
    code, _, err = run_cli(["bench", "--benchmark", "toy", "--steps", "5", "--no-progress"],
                           capsys)
    assert code == 0, err
    assert Path(specs[0].out) == Path("benchmarks/toy-mtrl")


# ---------------------------------------------------------------------- report
@pytest.fixture(scope="module")
def small_bench(tmp_path_factory) -> Path:
    """Two methods, two seeds each (runs as the trainer writes them)."""
    root = tmp_path_factory.mktemp("bench")
    for balancer, runs in (("mean", MEAN_RUNS), ("cagrad", CAGRAD_RUNS)):
        for seed in (0, 1):
            write_run(root / "runs" / balancer / f"seed{seed}", balancer, seed,
                      {k: [float(x) for x in v] for k, v in runs[seed].items()})
    return root


@pytest.fixture
def report_calls(monkeypatch) -> list[dict]:
    """Record the keyword arguments `mtrl report` passes to write_report (then call it)."""
    calls: list[dict] = []
    real = mtrl.report.write_report

    def write_report(root, **kwargs):
        calls.append(kwargs)
        return real(root, **kwargs)

    monkeypatch.setattr(mtrl.report, "write_report", write_report)
    return calls


def test_report_no_plots_writes_no_png_and_passes_the_bootstrap_options(
        small_bench, tmp_path, capsys, report_calls):
    """--no-plots: no PNG written (PNGs without it); --reps/--poi-reps reach write_report."""
    bare = tmp_path / "bare"
    code, out, err = run_cli(["report", str(small_bench), "--out", str(bare), "--reps", "30",
                              "--poi-reps", "7", "--no-plots"], capsys)
    assert code == 0, err
    assert report_calls == [{"out_dir": str(bare), "reps": 30, "poi_reps": 7, "plots": False}]
    assert (bare / "summary.md").is_file() and (bare / "results.csv").is_file()
    assert list(bare.rglob("*.png")) == []
    assert ".png" not in out

    plotted = tmp_path / "plotted"
    code, out, err = run_cli(["report", str(small_bench), "--out", str(plotted), "--reps", "20",
                              "--poi-reps", "5"], capsys)
    assert code == 0, err
    assert report_calls[1] == {"out_dir": str(plotted), "reps": 20, "poi_reps": 5,
                               "plots": True}
    pngs = sorted(plotted.rglob("*.png"))
    assert pngs
    assert all(f"wrote {p}" in out for p in pngs)
