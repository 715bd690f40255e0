"""Bench reruns that change nested settings or balancer kwargs, a bench report error,
resume of other balancer kwargs, eval_episodes validation, every preset against
DESIGN.md, and `mtrl eval` repeating a run's own numbers and CSV layout."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from mtrl.config import ConfigError, TrainConfig, load_preset, resume_changes, to_dict, validate


# ---------------------------------------------------------------- bench
def _existing_run(tmp_path, balancer="cagrad"):
    from mtrl.bench import BenchSpec, plan_runs

    spec = BenchSpec(benchmark="toy", balancers=(balancer,), seeds=1, steps=40, out=tmp_path)
    (plan,) = plan_runs(spec)
    plan.run_dir.mkdir(parents=True)
    (plan.run_dir / "result.json").write_text(json.dumps({"step": 40}))
    return spec, plan, plan_runs


def test_bench_refuses_a_run_with_other_nested_settings(tmp_path):
    """A finished run with other network sizes is another experiment."""
    spec, plan, plan_runs = _existing_run(tmp_path)
    old = json.loads(json.dumps(plan.config))
    old["sac"]["hidden_sizes"] = [7, 7]
    (plan.run_dir / "config.json").write_text(json.dumps(old))
    with pytest.raises(ConfigError, match=r"sac\.hidden_sizes: \[7, 7\] -> "):
        plan_runs(spec)


def test_bench_refuses_a_run_with_other_balancer_kwargs(tmp_path):
    """cagrad c=0.9 on disk, the bench now asks for the default (no kwargs)."""
    spec, plan, plan_runs = _existing_run(tmp_path)
    (plan.run_dir / "config.json").write_text(
        json.dumps({**plan.config, "balancer_kwargs": {"c": 0.9}}))
    with pytest.raises(ConfigError, match=r"balancer_kwargs"):
        plan_runs(spec)


def test_bench_result_with_a_report_error_is_a_failure():
    """run_bench's exit code is nonzero when the report could not be written."""
    from mtrl.bench import BenchResult

    done = {"status": "done", "action": "started"}
    assert BenchResult(Path("."), [done]).exit_code == 0
    assert BenchResult(Path("."), [done], report_error="no rliable").exit_code == 1


# ---------------------------------------------------------------- config
def test_resume_refuses_other_balancer_kwargs():
    """resuming cagrad c=0.4 as c=0.9 changes what is trained."""
    saved = to_dict(TrainConfig(balancer="cagrad", balancer_kwargs={"c": 0.4}))
    changes = resume_changes(saved, TrainConfig(balancer="cagrad", balancer_kwargs={"c": 0.9}))
    assert changes == ['balancer_kwargs: {"c": 0.4} -> {"c": 0.9}']


@pytest.mark.parametrize("episodes", [0, -1])
def test_eval_episodes_must_be_positive(episodes):
    """0 or negative episodes per task: an evaluation of nothing (it was accepted)."""
    with pytest.raises(ConfigError, match="eval_episodes must be an integer >= 1"):
        validate(TrainConfig(eval_episodes=episodes))


PRESETS = sorted(p.stem for p in (Path(__import__("mtrl").__file__).parent.parent
                                  / "configs").glob("mt*_*.json") if "demo" not in p.stem)
DESIGN_KWARGS = {  # DESIGN.md "Defaults that follow the published multi-task RL setups"
    "mt10": {"cagrad": {"c": 0.9}, "sdmgrad": {"lam": 0.6}, "fairgrad": {"alpha": 2.0},
             "famo": {"gamma": 0.01, "lr": 0.025}},
    "mt50": {"cagrad": {"c": 0.5}, "sdmgrad": {"lam": 0.6}, "fairgrad": {"alpha": 2.0},
             "famo": {"gamma": 0.01, "lr": 0.025}},
}


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_follows_design(name):
    """Every MT10/MT50 preset: its protocol's episodes, a batch that splits into the
    tasks, 3x400 networks, and the DESIGN hyper-parameters (MT50 = MT10 except CAGrad c and
    SDMGrad-OS tasks)."""
    bench, balancer = name.split("_", 1)
    cfg = load_preset(name)
    k = {"mt10": 10, "mt50": 50}[bench]
    validate(cfg, num_tasks=k)
    episodes = {"mtrl": (150, "fixed"), "metaworld-plus": (500, "random")}[cfg.protocol]
    assert (cfg.env.max_episode_steps, cfg.env.goal_mode) == episodes
    assert cfg.env.benchmark == bench.upper()
    assert cfg.sac.hidden_sizes == (400, 400, 400)
    assert cfg.batch_size == {"mt10": 1280, "mt50": 1250}[bench]  # 128 / 25 per task
    assert cfg.buffer_capacity == 1_000_000
    expected = DESIGN_KWARGS[bench].get(balancer.replace("_", "-"))
    if expected is not None:
        assert cfg.balancer_kwargs == expected
    if balancer == "sdmgrad_os":
        assert cfg.balancer_kwargs == {"lam": 0.6, "num_sampled": {"mt10": 4, "mt50": 8}[bench]}
    if balancer == "famo":
        assert cfg.sac.balance == ("critic",)


# ---------------------------------------------------------------- evaluate_run
@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    from mtrl.agents.sac import SACConfig
    from mtrl.envs import EnvConfig
    from mtrl.trainer import train

    run = tmp_path_factory.mktemp("toy") / "run"
    cfg = TrainConfig(env=EnvConfig(benchmark="toy", max_episode_steps=20, seed=3),
                      sac=SACConfig(hidden_sizes=(16, 16)), total_steps=40, warmup_steps=20,
                      batch_size=16, buffer_capacity=400, eval_every=20, eval_episodes=2,
                      log_every=10, checkpoint_every=40, progress=False, run_dir=str(run),
                      device="cpu")  # evaluated on the CPU below: same numbers
    train(cfg)
    return run


def test_eval_repeats_the_runs_own_numbers(toy_run, tmp_path):
    """Same protocol, episodes and step -> the run's own final evaluation, returns too."""
    from mtrl.evaluate_run import evaluate_run

    record, _ = evaluate_run(toy_run, device="cpu", out_dir=tmp_path)
    final = json.loads((toy_run / "result.json").read_text())["final_eval"]
    assert record["step"] == final["step"] == 40
    assert record["success"] == pytest.approx(final["success"])
    assert record["return"] == pytest.approx(final["return"])


def test_eval_shows_its_progress_unless_told_not_to(toy_run, tmp_path, monkeypatch, capsys):
    """A metaworld-plus evaluation runs for minutes: `mtrl eval` shows a bar over its
    vector-env steps (here stderr is not a terminal: plain lines, one per interval)."""
    from mtrl.cli import main
    from mtrl.progress import Progress

    monkeypatch.setattr(Progress, "LINE_INTERVAL_S", 0.0)
    main(["eval", str(toy_run), "--device", "cpu", "--out", str(tmp_path)])
    first, *lines = capsys.readouterr().err.splitlines()
    assert first == "building the toy environments ..."
    # the run's evaluation: 2 episodes of the mtrl protocol's 150 steps
    assert [line.split(" steps")[0] for line in lines] == [
        f"eval: {n}/300" for n in range(1, 301)]
    main(["eval", str(toy_run), "--device", "cpu", "--out", str(tmp_path), "--no-progress"])
    assert capsys.readouterr().err == ""


def test_eval_csv_columns(toy_run, tmp_path, monkeypatch):
    """eval_<step>.csv: task, success_rate, mean_return, matching the JSON on disk. The
    success rates are made to differ per task (the toy run's are all 0, so a constant
    column passed; found by an audit)."""
    import dataclasses

    import mtrl.envs
    from mtrl.evaluate_run import evaluate_run

    real = mtrl.envs.evaluate

    def distinct(*args, **kwargs):
        result = real(*args, **kwargs)
        rates = {t: i / 4 for i, t in enumerate(result.task_names)}
        return dataclasses.replace(result, success_rate=rates,
                                   mean_success=sum(rates.values()) / len(rates))

    monkeypatch.setattr(mtrl.envs, "evaluate", distinct)
    record, (json_path, csv_path) = evaluate_run(toy_run, device="cpu", out_dir=tmp_path)
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["task", "success_rate", "mean_return"]
    saved = json.loads(json_path.read_text())
    assert saved == record
    assert {r["task"]: float(r["success_rate"]) for r in rows} == saved["success"] == {
        "toy-0": 0.0, "toy-1": 0.25, "toy-2": 0.5, "toy-3": 0.75}
    assert {r["task"]: float(r["mean_return"]) for r in rows} == saved["return"]
    assert len(set(saved["return"].values())) > 1  # (so the return column is checked too)


@pytest.fixture
def one_episode(monkeypatch):
    """mtrl.envs.evaluate runs one episode per task whatever is asked (a metaworld-plus
    evaluation of the toy run would take 50 x 500 steps) and records what was asked."""
    import mtrl.envs

    real, asked = mtrl.envs.evaluate, []

    def quick(policy, envs, episodes, **kwargs):
        asked.append(episodes)
        return real(policy, envs, 1, **kwargs)

    monkeypatch.setattr(mtrl.envs, "evaluate", quick)
    return asked


def test_another_protocol_gets_its_own_files_and_episode_count(toy_run, tmp_path, one_episode):
    """(Mutation testing:) `--protocol metaworld-plus` must neither overwrite the run's own
    eval_<step>.json (also with the run's episode count) nor default to the run's count."""
    from mtrl.evaluate_run import evaluate_run

    own, (own_json, _) = evaluate_run(toy_run, device="cpu", out_dir=tmp_path)
    other, (other_json, _) = evaluate_run(toy_run, protocol="metaworld-plus", device="cpu",
                                          out_dir=tmp_path)
    same_count, (same_count_json, _) = evaluate_run(
        toy_run, protocol="metaworld-plus", episodes_per_task=2, device="cpu", out_dir=tmp_path)
    assert one_episode == [2, 50, 2]  # the run's eval_episodes, then the protocol's 50
    assert own_json.name == "eval_40.json" and other_json.name == "eval_40_metaworld-plus_50ep.json"
    assert same_count_json.name == "eval_40_metaworld-plus_2ep.json"
    assert json.loads(own_json.read_text())["protocol"] == "mtrl"
    assert (other["episodes_per_task"], same_count["protocol"]) == (50, "metaworld-plus")


def test_eval_without_the_plugin_that_trained_the_run(tmp_path):
    """A run trained by a plug-in balancer that is not installed where it is evaluated:
    `mtrl eval` failed with "unknown balancer ..." although evaluation uses the actor
    alone. It now leaves the balancer's state out, says so, and gives the run's numbers."""
    from mtrl.agents.sac import SACConfig
    from mtrl.envs import EnvConfig
    from mtrl.evaluate_run import evaluate_run
    from mtrl.trainer import train

    run = tmp_path / "run"
    cfg = TrainConfig(env=EnvConfig(benchmark="toy", max_episode_steps=20, seed=3),
                      sac=SACConfig(hidden_sizes=(16, 16)), balancer="sdmgrad",
                      total_steps=40, warmup_steps=20, batch_size=16, buffer_capacity=400,
                      eval_every=0, eval_episodes=2, checkpoint_every=40, progress=False,
                      run_dir=str(run), device="cpu")
    train(cfg)
    config = json.loads((run / "config.json").read_text())
    config["balancer"] = "gone_package.balancers:Gone"  # (sdmgrad has state to leave out)
    (run / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="gone_package.*: evaluating without the balancer's "
                      r"state \(the evaluation does not use it\)"):
        record, _ = evaluate_run(run, device="cpu", out_dir=tmp_path / "out")
    final = json.loads((run / "result.json").read_text())["final_eval"]
    assert record["success"] == pytest.approx(final["success"])
    assert record["return"] == pytest.approx(final["return"])


def test_a_checkpoint_file_is_evaluated_not_the_runs_latest(toy_run, tmp_path):
    """`mtrl eval RUN/step20.pt` evaluates that file, not RUN/checkpoint.pt."""
    import torch

    from mtrl.checkpoint import load_checkpoint, save_checkpoint
    from mtrl.evaluate_run import evaluate_run

    state = load_checkpoint(toy_run / "checkpoint.pt", map_location="cpu")
    state["step"] = 20
    with torch.no_grad():
        next(iter(state["agent"].values())).mul_(0.5)  # another policy too
    copy = toy_run / "step20.pt"
    save_checkpoint(copy, state)
    try:
        record, _ = evaluate_run(copy, device="cpu", out_dir=tmp_path)
    finally:
        copy.unlink()
    assert record["step"] == 20
