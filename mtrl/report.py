"""Benchmark report: statistics over seeds, Markdown/CSV tables and plots from run directories.

    from mtrl.report import write_report
    summary = write_report("benchmarks/mt10-short")   # finds every run dir below it

A run directory is any folder holding a ``config.json`` written by the trainer. Runs are
grouped by (benchmark, protocol) and reported the way the field reports each protocol:

* ``mtrl`` (fixed goals, 150-step episodes, one episode per task per evaluation):
  seed-mean learning curve, final success ± standard error over seeds, and the
  *best-over-time* value (the maximum of the seed-mean curve; optimistic, because it picks
  the evaluation step using the results, but it is the number the mtrl-lineage papers
  publish).
* ``metaworld-plus`` (random goals, 500-step episodes, 50 episodes per task): mean and
  interquartile mean (IQM) of the final per-task success with 95% stratified-bootstrap
  confidence intervals over seeds, and the probability of improvement between balancers
  (both from ``rliable``).

Both tables carry every column so that numbers can be compared across protocols; the notes
under each table say which numbers are that protocol's headline. Only finished runs (those
with ``result.json``) enter the statistics; unfinished ones are listed separately.

Outputs (all written atomically): ``results.csv`` (one row per run × evaluation × task),
``summary.md``, ``summary.json`` and PNG plots named ``<kind>_<benchmark>_<protocol>.png``
(``learning_curves``, ``task_heatmap``, ``diagnostics_weights``, ``diagnostics_conflict``).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mtrl.checkpoint import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_json_object,
)

CSV_COLUMNS = ("balancer", "seed", "step", "env_steps", "task", "success", "return", "protocol",
               "benchmark")
PROTOCOL_NOTES = {
    "mtrl": "fixed goal per task, 150-step episodes, deterministic policy",
    "metaworld-plus": "goals resampled per episode, 500-step episodes, deterministic policy",
}
#: Files that make a folder with a config.json a run directory even when that config.json
#: cannot be read.
RUN_FILES = ("checkpoint.pt", "eval.jsonl", "metrics.jsonl", "result.json")
DEFAULT_REPS = 10_000
DEFAULT_POI_REPS = 1_000


class ReportError(ValueError):
    """The report cannot be made (e.g. no run directories below the given folder)."""


# ====================================================================== statistics
def standard_error(values: Sequence[float] | np.ndarray) -> float:
    """Standard error of the mean over seeds: sample std (ddof=1) / sqrt(n); NaN when n < 2."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if x.size < 2:
        return float("nan")
    return float(x.std(ddof=1) / math.sqrt(x.size))


@dataclass(frozen=True)
class Curve:
    """A seed-mean learning curve: value and standard error at each evaluation step."""

    steps: np.ndarray  # (T,)
    env_steps: np.ndarray  # (T,)
    mean: np.ndarray  # (T,)
    se: np.ndarray  # (T,)
    count: np.ndarray  # (T,) seeds that have an evaluation at that step


def seed_mean_curve(
    per_seed: Sequence[dict[int, float]], env_steps: dict[int, int] | None = None
) -> Curve:
    """Average per-seed curves ({step: value}) step by step over the seeds that have the step."""
    steps = sorted({s for curve in per_seed for s in curve})
    mean, se, count = [], [], []
    for s in steps:
        vals = [curve[s] for curve in per_seed if s in curve]
        mean.append(float(np.nanmean(vals)) if vals else float("nan"))
        se.append(standard_error(vals))
        count.append(len(vals))
    env = env_steps or {}
    return Curve(
        steps=np.asarray(steps, dtype=np.int64),
        env_steps=np.asarray([env.get(s, s) for s in steps], dtype=np.int64),
        mean=np.asarray(mean, dtype=float),
        se=np.asarray(se, dtype=float),
        count=np.asarray(count, dtype=np.int64),
    )


def best_over_time(curve: Curve) -> tuple[float, int, float]:
    """(value, step, s.e.) at the maximum of the seed-mean curve.

    Only the steps reached by the most seeds are considered: every seed's steps when
    there are any (a step that one lucky seed reached alone would otherwise decide the
    number), else those reached by as many seeds as any step is.
    """
    if curve.steps.size == 0:
        return float("nan"), -1, float("nan")
    full = curve.count == curve.count.max()
    values = np.where(full & ~np.isnan(curve.mean), curve.mean, -np.inf)
    if not np.isfinite(values).any():
        return float("nan"), -1, float("nan")
    i = int(np.argmax(values))  # first step reaching the maximum
    return float(curve.mean[i]), int(curve.steps[i]), float(curve.se[i])


def _rliable():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from rliable import library, metrics
    except Exception as exc:  # not installed, or arch/pandas incompatibility
        raise ReportError(
            "interval estimates need the 'rliable' package (pip install 'mtrl[bench]'); "
            f"importing it failed: {type(exc).__name__}: {exc}"
        ) from exc
    return library, metrics


@contextlib.contextmanager
def _numpy_global_seed(seed: int) -> Iterator[None]:
    """Seed NumPy's global generator for the duration, then put its state back.

    rliable takes a ``random_state`` but (1.2.0 with arch 7) its stratified bootstraps
    draw from ``np.random.choice``: the intervals changed on every report and the
    caller's global state was consumed. Both are fixed here; the ``random_state`` is
    still passed, for versions that use it."""
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(saved)


def _stream_seed(seed: int, *names: str) -> int:
    """The bootstrap seed of one method (or one pair of methods): from the report's seed
    and those names only, so a method's interval does not move when another method is
    added to or removed from the folder (one shared stream made it depend on the methods
    drawn before it)."""
    digest = hashlib.sha256(json.dumps([seed, *names]).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _key(stream_keys: Mapping[str, str] | None, name: str) -> str:
    return name if stream_keys is None else stream_keys[name]


def _bootstrap(library: Any, name: str, data: Any, fn: Any, reps: int, seed: int):
    """rliable's ``get_interval_estimates`` of one entry, on its own random stream."""
    with warnings.catch_warnings(), _numpy_global_seed(seed):
        warnings.simplefilter("ignore")
        point, ci = library.get_interval_estimates(
            {name: data}, fn, reps=reps, random_state=np.random.RandomState(seed),
        )
    return point[name], ci[name]


def interval_estimates(
    scores: dict[str, np.ndarray], reps: int = DEFAULT_REPS, seed: int = 0,
    stream_keys: Mapping[str, str] | None = None,
) -> dict[str, dict[str, tuple[float, float, float]]]:
    """Mean and IQM of each (seeds × tasks) score matrix with 95% stratified-bootstrap CIs.

    Returns {name: {"mean": (point, low, high), "iqm": (point, low, high)}} (rliable
    ``get_interval_estimates``; the bootstrap resamples seeds independently per task).
    Each method's bootstrap draws from its own stream (:func:`_stream_seed`), seeded by
    ``stream_keys[name]`` (default: the name itself).
    """
    library, metrics = _rliable()

    def aggregate(x: np.ndarray) -> np.ndarray:
        return np.array([metrics.aggregate_mean(x), metrics.aggregate_iqm(x)])

    point, ci = {}, {}
    for name, x in scores.items():
        point[name], ci[name] = _bootstrap(library, name, np.asarray(x, dtype=float),
                                           aggregate, reps,
                                           _stream_seed(seed, _key(stream_keys, name)))
    out = {}
    for name in scores:
        p, c = np.asarray(point[name], dtype=float), np.asarray(ci[name], dtype=float)
        out[name] = {
            "mean": (float(p[0]), float(c[0, 0]), float(c[1, 0])),
            "iqm": (float(p[1]), float(c[0, 1]), float(c[1, 1])),
        }
    return out


def probability_of_improvement(
    scores: dict[str, np.ndarray], reps: int = DEFAULT_POI_REPS, seed: int = 0,
    stream_keys: Mapping[str, str] | None = None,
) -> dict[tuple[str, str], tuple[float, float, float]]:
    """P(X > Y) for every ordered pair of score matrices, with 95% bootstrap CIs (rliable).

    rliable computes the pairs X < Y (in ``scores`` order); the reverse pairs follow from
    P(Y > X) = 1 - P(X > Y) (ties count one half). Each pair's bootstrap draws from its
    own stream (:func:`_stream_seed`), seeded by the pair's ``stream_keys`` (default: the
    names).
    """
    library, metrics = _rliable()
    names = list(scores)
    out: dict[tuple[str, str], tuple[float, float, float]] = {}
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            pair = (np.asarray(scores[x], dtype=float), np.asarray(scores[y], dtype=float))
            point, ci = _bootstrap(library, f"{x},{y}", pair, metrics.probability_of_improvement,
                                   reps, _stream_seed(seed, _key(stream_keys, x),
                                                      _key(stream_keys, y)))
            p = float(np.asarray(point))
            c = np.asarray(ci, dtype=float).reshape(-1)
            lo, hi = float(c[0]), float(c[-1])
            out[(x, y)] = (p, lo, hi)
            out[(y, x)] = (1.0 - p, 1.0 - hi, 1.0 - lo)
    return out


# ====================================================================== loading runs
def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL log, as one consistent history.

    A line cut short by a crash is skipped. A resumed run logs again from its checkpoint
    step, so records at or after a step that reappears are replaced by the newer session's.
    """
    if not path.is_file():
        return []
    records: list[dict[str, Any]] = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict) or not _is_int(rec.get("step")):
            continue  # (a record without an integer step: hand-edited or damaged)
        while records and records[-1]["step"] >= rec["step"]:
            records.pop()
        records.append(rec)
    return records


@dataclass
class Run:
    """One training run directory, parsed."""

    path: Path
    config: dict[str, Any]
    evals: list[dict[str, Any]]
    metrics: list[dict[str, Any]]
    result: dict[str, Any] | None
    label: str = ""
    #: Why config.json could not be read (the run is then listed, not reported).
    config_error: str | None = None

    @property
    def balancer(self) -> str:
        return str(self.config.get("balancer", "?"))

    @property
    def seed(self) -> int | None:
        """The run's seed (the config's default, 0, when the key is absent); ``None`` in a
        config.json without an integer one, or one that cannot be read."""
        if self.config_error is not None:
            return None
        seed = _mapping(self.config.get("env")).get("seed", 0)
        return seed if _is_int(seed) else None

    @property
    def benchmark(self) -> str:
        return str(_mapping(self.config.get("env")).get("benchmark", "?"))

    @property
    def problem(self) -> str | None:
        """Why the run's config.json cannot be reported (a hand-edited or damaged file)."""
        if self.config_error:
            return self.config_error
        env = self.config.get("env")
        if not isinstance(env, dict):
            return "config.json: env is not a section"
        if self.seed is None:
            return f"config.json: env.seed {env.get('seed')!r} is not an integer"
        if not isinstance(env.get("benchmark", ""), str):
            return f"config.json: env.benchmark {env.get('benchmark')!r} is not a name"
        if not isinstance(self.config.get("balancer"), str):
            return f"config.json: balancer {self.config.get('balancer')!r} is not a name"
        if not isinstance(self.config.get("balancer_kwargs") or {}, dict):
            return "config.json: balancer_kwargs is not a section"
        return None

    @property
    def protocol(self) -> str:
        return str(self.config.get("protocol", "?"))

    @property
    def finished(self) -> bool:
        """A result.json that covers the configured length (a run extended with a larger
        ``total_steps`` and not yet done is unfinished, whatever an old result says)."""
        if self.result is None:
            return False
        step, total = self.result.get("step"), self.config.get("total_steps")
        return not (isinstance(step, int) and isinstance(total, int) and step < total)

    @property
    def task_names(self) -> list[str]:
        names = self.config.get("task_names")
        if names:
            return list(names)
        final = self.final_eval  # older runs: the tasks their evaluations name
        return list(_mapping(final.get("success"))) if final else []

    @property
    def final_eval(self) -> dict[str, Any] | None:
        if self.result and isinstance(self.result.get("final_eval"), dict):
            return self.result["final_eval"]
        return self.evals[-1] if self.evals else None

    def final_scores(self, tasks: Sequence[str]) -> np.ndarray:
        success = _mapping((self.final_eval or {}).get("success"))
        return np.array([_number(success.get(t)) for t in tasks])

    def final_step(self) -> int | None:
        final = self.final_eval
        return int(final["step"]) if final and isinstance(final.get("step"), int) else None

    def success_curve(self) -> dict[int, float]:
        """{step: mean success over the run's tasks}, for evaluations where every task
        has a number: one with a task's value missing (absent, None, NaN: a hand-edited
        or damaged log) is left out, so the seed does not count as having reached that
        step."""
        curve = {}
        tasks = self.task_names
        for r in self.evals:
            success = _mapping(r.get("success"))
            values = [_number(success.get(t)) for t in tasks]
            if values and all(math.isfinite(v) for v in values):
                curve[int(r["step"])] = float(np.mean(values))
        return curve


def _number(x: Any) -> float:
    """A logged value as a float; NaN for anything that is not a number (None, text)."""
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _mapping(x: Any) -> dict[str, Any]:
    """A logged section (per-task success, returns); empty for anything that is not one."""
    return x if isinstance(x, dict) else {}


def _env_steps(record: dict[str, Any]) -> int:
    """A record's env steps; its step where it logs none (or no integer)."""
    value = record.get("env_steps")
    return value if _is_int(value) else record["step"]


def load_runs(root: str | Path) -> list[Run]:
    """Every run directory (a folder with ``config.json``) below ``root``, sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise ReportError(f"{str(root)!r} is not a directory")
    runs = []
    for cfg_path in sorted(root.rglob("config.json")):
        d = cfg_path.parent
        config, error = read_json_object(cfg_path), None
        if config is None and any((d / name).exists() for name in RUN_FILES):
            # a run directory whose config.json is damaged: listed, not silently dropped
            config, error = {}, "config.json cannot be read (not a JSON object)"
        elif config is None or "env" not in config or "balancer" not in config:
            continue  # not a trainer's config.json
        runs.append(Run(
            path=d, config=config, evals=read_jsonl(d / "eval.jsonl"),
            metrics=read_jsonl(d / "metrics.jsonl"), result=read_json_object(d / "result.json"),
            config_error=error,
        ))
    _assign_labels(runs)
    return runs


def _same_numbers(value: Any) -> Any:
    """Whole-number floats as ints, in sections and lists too: ``c 1`` and ``c 1.0`` on
    the command line (or a run saved before integers were kept as such) are one setting,
    not two methods."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _same_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_same_numbers(v) for v in value]
    return value


def _method_identity(run: Run) -> str:
    """The balancer and its settings, whatever label the folder's other runs give it."""
    return f"{run.balancer} {_canonical(_mapping(run.config.get('balancer_kwargs')))}"


def _assign_labels(runs: list[Run]) -> None:
    """Label = balancer name; with its hyper-parameters when one name ran with several."""
    kwargs_seen: dict[str, set[str]] = {}
    for r in runs:
        kwargs_seen.setdefault(r.balancer, set()).add(
            _canonical(_mapping(r.config.get("balancer_kwargs"))))
    for r in runs:
        kw = _same_numbers(_mapping(r.config.get("balancer_kwargs")))
        if len(kwargs_seen[r.balancer]) > 1 and kw:
            r.label = f"{r.balancer}({', '.join(f'{k}={v}' for k, v in sorted(kw.items()))})"
        else:
            r.label = r.balancer


# ====================================================================== per-group summary
@dataclass
class MethodSummary:
    label: str
    seeds: list[int]
    final_scores: np.ndarray  # (seeds, tasks)
    final_mean: float
    final_se: float
    curve: Curve
    best: float
    best_step: int
    best_se: float
    env_steps: float
    wall_clock_s: float
    env_steps_per_s: float
    mean_ci: tuple[float, float, float] = (math.nan, math.nan, math.nan)
    iqm_ci: tuple[float, float, float] = (math.nan, math.nan, math.nan)


@dataclass
class GroupSummary:
    benchmark: str
    protocol: str
    tasks: list[str]
    methods: dict[str, MethodSummary]
    poi: dict[tuple[str, str], tuple[float, float, float]] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)
    #: Things that make the group's numbers harder to compare (mixed run lengths, ...).
    warnings: list[str] = field(default_factory=list)
    #: Distinguishes groups with the same benchmark and protocol (other task lists).
    tag: str = ""

    @property
    def slug(self) -> str:
        base = f"{self.benchmark}_{self.protocol}" + (f"_{self.tag}" if self.tag else "")
        return base.lower().replace("-", "_").replace(" ", "_")

    @property
    def episodes_per_task(self) -> list[int]:
        """The episodes per task of the runs' final evaluations (one value unless mixed)."""
        return _final_episodes(self.runs)


def _final_episodes(runs: Sequence[Run]) -> list[int]:
    return sorted({int(f["episodes_per_task"]) for r in runs
                   if (f := r.final_eval) and isinstance(f.get("episodes_per_task"), int)})


def _method_order(labels: Iterable[str]) -> list[str]:
    """Baseline ``mean`` first, then alphabetical."""
    return sorted(set(labels), key=lambda x: (x != "mean", x))


def _nanmean(values: Iterable[Any]) -> float:
    x = np.array([float(v) for v in values if isinstance(v, (int, float))], dtype=float)
    return float(np.nanmean(x)) if x.size and not np.isnan(x).all() else float("nan")


def summarize_group(
    runs: list[Run], reps: int = DEFAULT_REPS, poi_reps: int = DEFAULT_POI_REPS, seed: int = 0
) -> GroupSummary:
    """Statistics of finished runs that share a benchmark and a protocol."""
    first = runs[0]
    tasks = first.task_names
    methods: dict[str, MethodSummary] = {}
    for label in _method_order(r.label for r in runs):
        mruns = sorted((r for r in runs if r.label == label), key=lambda r: r.seed)
        scores = np.stack([r.final_scores(tasks) for r in mruns])
        finals = np.nanmean(scores, axis=1)
        env_map = {e["step"]: _env_steps(e) for r in mruns for e in r.evals}
        curve = seed_mean_curve([r.success_curve() for r in mruns], env_map)
        best, best_step, best_se = best_over_time(curve)
        res = [r.result or {} for r in mruns]
        methods[label] = MethodSummary(
            label=label,
            seeds=[r.seed for r in mruns],
            final_scores=scores,
            final_mean=float(np.nanmean(finals)),
            final_se=standard_error(finals),
            curve=curve,
            best=best,
            best_step=best_step,
            best_se=best_se,
            env_steps=_nanmean(x.get("env_steps") for x in res),
            wall_clock_s=_nanmean(x.get("wall_clock_s") for x in res),
            env_steps_per_s=_nanmean(x.get("env_steps_per_s") for x in res),
        )
    group = GroupSummary(first.benchmark, first.protocol, tasks, methods, runs=runs)
    # write_report leaves out runs with missing final scores; NaNs here would come from a
    # direct caller and cannot go into rliable
    scores = {k: np.nan_to_num(m.final_scores, nan=0.0) for k, m in methods.items()}
    # streams seeded by what a method is (balancer and its settings), not by its label,
    # which gains the settings when another setting of the same balancer joins the folder
    keys = {r.label: _method_identity(r) for r in runs}
    nan3 = (math.nan, math.nan, math.nan)
    for k, est in interval_estimates(scores, reps=reps, seed=seed, stream_keys=keys).items():
        methods[k].mean_ci, methods[k].iqm_ci = est["mean"], est["iqm"]
        if len(methods[k].seeds) < 2:  # a bootstrap over one run has no width: no interval
            methods[k].mean_ci = (est["mean"][0], math.nan, math.nan)
            methods[k].iqm_ci = (est["iqm"][0], math.nan, math.nan)
    if group.protocol == "metaworld-plus" and len(methods) > 1:
        group.poi = probability_of_improvement(scores, reps=poi_reps, seed=seed,
                                               stream_keys=keys)
        for (x, y), (p, _, _) in list(group.poi.items()):
            if min(len(methods[x].seeds), len(methods[y].seeds)) < 2:
                group.poi[(x, y)] = (p, nan3[1], nan3[2])
    group.warnings = _group_warnings(runs)
    return group


def _group_warnings(runs: Sequence[Run]) -> list[str]:
    out = []
    lengths = sorted({r.config.get("total_steps") for r in runs
                      if isinstance(r.config.get("total_steps"), int)})
    if len(lengths) > 1:
        out.append(f"runs of different lengths are pooled (total_steps {lengths})")
    ends = sorted({s for r in runs if (s := r.final_step()) is not None})
    if len(ends) > 1:
        out.append(f"final evaluations at different steps are pooled ({ends}); best over "
                   "time only counts steps every seed reached")
    episodes = _final_episodes(runs)
    if len(episodes) > 1:
        out.append(f"final evaluations with different episodes per task are pooled ({episodes})")
    train_envs = sorted({_train_env(r) for r in runs} - {None}, key=str)
    if len(train_envs) > 1:
        shown = ", ".join(f"{steps} steps / {goals} goals" for steps, goals in train_envs)
        out.append(f"runs trained on different episodes are pooled ({shown})")
    return out + _settings_warnings(runs)


#: Settings that differ between the methods of one comparison by design: the method, its
#: hyper-parameters, and which SAC losses it balances (FAMO's preset: the critic only).
METHOD_KEYS = ("balancer", "balancer_kwargs", "sac.balance")
#: Settings compared by the other notes (run length, training episodes, evaluation
#: episodes), by the grouping (benchmark, protocol, task list), or that differ by design
#: (the seed).
_NOTED_KEYS = ("env.seed", "env.benchmark", "env.max_episode_steps", "env.goal_mode",
               "protocol", "task_names", "eval_episodes")
_SHOWN_KEYS = 4


def _canonical(value: Any) -> str:
    """A setting as JSON text, whole-number floats as integers (``1.0`` and ``1`` agree)."""
    return json.dumps(_same_numbers(value), sort_keys=True)


def _settings(run: Run) -> dict[str, str]:
    """A run's settings as {dotted key: JSON text}, less those a resumed run may change
    (run length, intervals, device, threads: they do not change what is trained) and
    those in :data:`_NOTED_KEYS`."""
    from mtrl.config import RESUME_MAY_CHANGE

    skip = {*RESUME_MAY_CHANGE, *_NOTED_KEYS}
    out: dict[str, str] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            key = prefix + k
            if isinstance(v, dict) and key != "balancer_kwargs":
                walk(v, key + ".")
            elif key not in skip:
                out[key] = _canonical(v)

    walk(run.config, "")
    return out


def _who(runs: Sequence[Run], by_seed: bool) -> str:
    if by_seed:
        seeds = sorted(r.seed for r in runs if r.seed is not None)
        return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds))
    return ", ".join(_method_order(r.label for r in runs))


def _differing(runs: Sequence[Run], settings: dict[int, dict[str, str]], keys: Iterable[str],
               by_seed: bool) -> dict[str, str]:
    """{key: ``key value (who) vs value (who)``} for each key whose value differs among
    ``runs``."""
    found = {}
    for key in keys:
        values: dict[str, list[Run]] = {}
        for r in runs:
            values.setdefault(settings[id(r)][key], []).append(r)
        if len(values) > 1:
            found[key] = f"{key} " + " vs ".join(
                f"{v} ({_who(rs, by_seed)})" for v, rs in sorted(values.items()))
    return found


def _listed(found: dict[str, str]) -> str:
    shown = list(found.values())
    if len(shown) > _SHOWN_KEYS:
        shown = [*shown[:_SHOWN_KEYS], f"and {len(shown) - _SHOWN_KEYS} more"]
    return "; ".join(shown)


def _settings_warnings(runs: Sequence[Run]) -> list[str]:
    """Notes for pooled runs of one method with different settings, and for methods
    trained with different settings (network sizes, learning rates, batch size, ...).
    Keys that some run does not record (an older version's config.json) are not compared."""
    settings = {id(r): _settings(r) for r in runs}
    common = set.intersection(*(set(x) for x in settings.values())) if settings else set()
    out, uniform = [], set(common)
    for label in _method_order(r.label for r in runs):
        mruns = [r for r in runs if r.label == label]
        diff = _differing(mruns, settings, sorted(common), by_seed=True)
        if diff:
            out.append(f"runs of {label} with different settings are pooled: {_listed(diff)}")
            uniform -= set(diff)
    across = sorted(k for k in uniform if k not in METHOD_KEYS)
    diff = _differing(runs, settings, across, by_seed=False)
    if diff:
        out.append(f"methods trained with different settings are compared: {_listed(diff)}")
    return out


def _train_env(run: Run) -> tuple[Any, Any] | None:
    """A run's training episodes: (max_episode_steps, goal_mode) from its config.json."""
    env = run.config.get("env")
    if not isinstance(env, dict) or "max_episode_steps" not in env:
        return None  # not recorded (hand-made or old run): nothing to compare
    return env.get("max_episode_steps"), env.get("goal_mode")


# ====================================================================== formatting
def _f(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _pm(value: float, se: float) -> str:
    return f"{_f(value)} ± {_f(se)}"


def _ci(est: tuple[float, float, float]) -> str:
    return f"{_f(est[0])} [{_f(est[1])}, {_f(est[2])}]"


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "n/a"
    if seconds < 60:
        return f"{seconds:.1f} s"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _num(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:,.0f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


SUMMARY_HEADER = (
    "balancer", "seeds", "final success (mean ± s.e.)", "mean [95% CI]", "IQM [95% CI]",
    "best over time ± s.e. (optimistic)", "at step", "env steps", "wall-clock", "env-steps/s",
)


def group_markdown(g: GroupSummary, reps: int, poi_reps: int, plots: dict[str, str]) -> list[str]:
    title = f"## {g.benchmark} — `{g.protocol}` protocol"
    lines = [title + (f" ({len(g.tasks)} tasks: {', '.join(g.tasks)})" if g.tag else ""), ""]
    if g.protocol in PROTOCOL_NOTES:
        eps = g.episodes_per_task
        per = (f"{eps[0]} episode(s) per task per evaluation" if len(eps) == 1 else
               f"episodes per task per evaluation: {', '.join(map(str, eps)) or 'unknown'}")
        lines += [f"Evaluation: {PROTOCOL_NOTES[g.protocol]}, {per}. {len(g.tasks)} tasks.", ""]
    lines += [f"**Note:** {w}." for w in g.warnings] + ([""] if g.warnings else [])
    rows = []
    for m in g.methods.values():
        rows.append((
            m.label, str(len(m.seeds)), _pm(m.final_mean, m.final_se), _ci(m.mean_ci),
            _ci(m.iqm_ci), _pm(m.best, m.best_se), str(m.best_step), _num(m.env_steps),
            _duration(m.wall_clock_s), _num(m.env_steps_per_s),
        ))
    lines += _table(SUMMARY_HEADER, rows)
    headline = (
        "Headline numbers for this protocol: **final success ± s.e.** and **best over time**."
        if g.protocol == "mtrl" else
        "Headline numbers for this protocol: **mean and IQM with 95% CIs** and the "
        "probability of improvement below."
    )
    lines += [
        "",
        f"{headline} Final success: the last evaluation's success averaged over tasks, then "
        "over seeds; s.e. is the standard error over seeds. Mean / IQM (interquartile mean "
        "over all seed × task scores of the final evaluation) with 95% stratified-bootstrap "
        f"confidence intervals over seeds (rliable, {reps} resamples). Best over time: the "
        "highest point of the seed-mean learning curve, i.e. the evaluation step is chosen "
        "with the results, so it is optimistic; it is the number the mtrl-lineage papers "
        "(CAGrad, SDMGrad, FairGrad on MT10/MT50) publish. Wall-clock and env-steps/s are "
        "per run, averaged over seeds.",
        "",
    ]
    if g.poi:
        names = list(g.methods)
        lines += [f"### Probability of improvement (P(row > column), rliable, {poi_reps} "
                  "resamples)", ""]
        lines += _table(("", *names), (
            (x, *("—" if x == y else _f(g.poi[(x, y)][0], 2) for y in names)) for x in names
        ))
        lines += [""]
        lines += [f"- P({x} > {y}) = {_ci(g.poi[(x, y)])}"
                  for i, x in enumerate(names) for y in names[i + 1:]]
        lines += [""]
    lines += ["### Final per-task success (seed mean)", ""]
    names = list(g.methods)
    lines += _table(("task", *names), (
        (t, *(_f(float(np.nanmean(g.methods[n].final_scores[:, j]))) for n in names))
        for j, t in enumerate(g.tasks)
    ))
    lines += [""]
    for title, fname in plots.items():
        lines += [f"![{title}]({fname})", ""]
    return lines


def group_json(g: GroupSummary) -> dict[str, Any]:
    def ci(e: tuple[float, float, float]) -> dict[str, float | None]:
        keys = ("point", "low", "high")
        return {k: (v if math.isfinite(v) else None) for k, v in zip(keys, e, strict=True)}

    def num(x: float) -> float | None:
        return x if math.isfinite(x) else None

    return {
        "benchmark": g.benchmark,
        "protocol": g.protocol,
        "tasks": g.tasks,
        "methods": {
            k: {
                "seeds": m.seeds,
                "final_mean": num(m.final_mean),
                "final_se": num(m.final_se),
                "mean": ci(m.mean_ci),
                "iqm": ci(m.iqm_ci),
                "best_over_time": num(m.best),
                "best_over_time_step": m.best_step,
                "best_over_time_se": num(m.best_se),
                "env_steps": num(m.env_steps),
                "wall_clock_s": num(m.wall_clock_s),
                "env_steps_per_s": num(m.env_steps_per_s),
                "final_task_success": {
                    t: num(float(np.nanmean(m.final_scores[:, j]))) for j, t in enumerate(g.tasks)
                },
                "curve": {
                    "step": m.curve.steps.tolist(),
                    "env_steps": m.curve.env_steps.tolist(),
                    "mean": [num(float(v)) for v in m.curve.mean],
                    "se": [num(float(v)) for v in m.curve.se],
                },
            }
            for k, m in g.methods.items()
        },
        "probability_of_improvement": {f"{x} > {y}": ci(v) for (x, y), v in g.poi.items()},
        "episodes_per_task": g.episodes_per_task,
        "warnings": g.warnings,
    }


def results_csv(runs: Sequence[Run]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in sorted(runs, key=lambda r: (r.benchmark, r.protocol, r.label, r.seed)):
        for e in r.evals:
            returns = _mapping(e.get("return"))
            for task, success in _mapping(e.get("success")).items():
                ret = returns.get(task, float("nan"))
                env_steps = e.get("env_steps")
                w.writerow((r.label, r.seed, e["step"], env_steps if _is_int(env_steps) else "",
                            task,
                            repr(_number(success)), repr(_number(ret)),
                            e.get("protocol", r.protocol), r.benchmark))
    return buf.getvalue()


# ====================================================================== plots
def _figure(nrows: int, ncols: int, width: float, height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig: Any, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _points(n: int) -> dict[str, Any]:
    """Line-plot style for ``n`` points: dots too when there are few (a short run's
    handful of evaluations would otherwise read as a smooth curve)."""
    return {"marker": "o" if n < 15 else None, "ms": 3}


def _steps_axis(ax: Any) -> None:
    """Env-step x axis in short engineering units (600k, 1.5M) and about 6 integer ticks:
    the full numbers ran into each other on the narrow panels of a long run."""
    from matplotlib.ticker import EngFormatter, MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))


def plot_learning_curves(g: GroupSummary, path: Path) -> None:
    fig, axes = _figure(1, 1, 7, 4.5)
    ax = axes[0, 0]
    for color, m in zip(_colors(len(g.methods)), g.methods.values(), strict=True):
        c = m.curve
        if c.steps.size == 0:
            continue
        se = np.nan_to_num(c.se, nan=0.0)
        ax.plot(c.env_steps, c.mean, color=color, label=f"{m.label} (n={len(m.seeds)})",
                **_points(c.steps.size))
        ax.fill_between(c.env_steps, c.mean - se, c.mean + se, color=color, alpha=0.2, lw=0)
    ax.set_xlabel("environment steps (all tasks)")
    _steps_axis(ax)
    ax.set_ylabel("success rate (mean over tasks)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title(f"{g.benchmark}, {g.protocol} protocol: seed mean, band = ± 1 s.e. over seeds",
                 fontsize=9)
    _save(fig, path)


def plot_task_heatmap(g: GroupSummary, path: Path) -> None:
    names = list(g.methods)
    data = np.array([np.nanmean(g.methods[n].final_scores, axis=0) for n in names])
    width = min(4 + 0.45 * len(g.tasks), 30)
    fig, axes = _figure(1, 1, width, 1.6 + 0.45 * len(names))
    ax = axes[0, 0]
    im = ax.imshow(data, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(g.tasks)), g.tasks, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    if len(g.tasks) <= 20:
        for i in range(len(names)):
            for j in range(len(g.tasks)):
                v = data[i, j]
                ax.text(j, i, "" if np.isnan(v) else f"{v:.2f}", ha="center", va="center",
                        fontsize=7, color="white" if v < 0.6 else "black")
    fig.colorbar(im, ax=ax, label="final success (seed mean)")
    ax.set_title(f"{g.benchmark}, {g.protocol} protocol: final per-task success", fontsize=9)
    _save(fig, path)


def _metric_series(runs: Sequence[Run], key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Seed-mean of a logged metric over env steps: (env_steps (T,), values (T,) or (T, K))."""
    by_step: dict[int, list[np.ndarray]] = {}
    for r in runs:
        for rec in r.metrics:
            if key not in rec or rec[key] is None:
                continue
            try:
                v = np.asarray(rec[key], dtype=float)
            except (TypeError, ValueError):
                continue  # not numbers (a hand-edited or damaged log)
            by_step.setdefault(_env_steps(rec), []).append(v)
    if not by_step:
        return None
    steps = sorted(by_step)
    shapes = {v.shape for vs in by_step.values() for v in vs}
    if len(shapes) != 1:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN steps (e.g. during warm-up)
        values = np.stack([np.nanmean(np.stack(by_step[s]), axis=0) for s in steps])
    if np.isnan(values).all():
        return None
    return np.asarray(steps), values


def _balanced_losses(runs: Sequence[Run], suffix: str) -> list[str]:
    found = {k.split("/")[0] for r in runs for rec in r.metrics for k in rec
             if k.endswith(suffix) and "/" in k}
    order = ["critic", "actor", "alpha"]
    return sorted(found, key=lambda x: (order.index(x) if x in order else len(order), x))


def plot_weights(g: GroupSummary, path: Path) -> bool:
    losses = _balanced_losses(g.runs, "/weights")
    if not losses:
        return False
    names = list(g.methods)
    fig, axes = _figure(len(losses), len(names), 3.2 * len(names) + 1.5, 2.4 * len(losses))
    colors = _colors(len(g.tasks))
    any_data = False
    for i, loss in enumerate(losses):
        for j, name in enumerate(names):
            ax = axes[i, j]
            series = _metric_series([r for r in g.runs if r.label == name], f"{loss}/weights")
            if series is not None and series[1].ndim == 2:
                any_data = True
                steps, values = series
                for k in range(values.shape[1]):
                    task = g.tasks[k] if k < len(g.tasks) else str(k)
                    ax.plot(steps, values[:, k], color=colors[k % len(colors)], lw=1,
                            label=task, **_points(len(steps)))
            else:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
            _steps_axis(ax)
            if i == 0:
                ax.set_title(name, fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{loss} task weights", fontsize=8)
            if i == len(losses) - 1:
                ax.set_xlabel("environment steps", fontsize=8)
    if not any_data:
        return False
    handles, labels = _fullest_legend(axes)
    if labels and len(labels) <= 20:
        fig.legend(handles, labels, loc="outside right center", fontsize=7)
    fig.suptitle(f"{g.benchmark}, {g.protocol}: per-task balancer weights (seed mean)",
                 fontsize=10)
    _save(fig, path)
    return True


def _fullest_legend(axes) -> tuple[list, list]:
    """Legend handles and labels of the panel that shows the most series."""
    handles, labels = [], []
    for ax in axes.flat:
        h, lab = ax.get_legend_handles_labels()
        if len(lab) > len(labels):
            handles, labels = h, lab
    return handles, labels


def plot_conflict(g: GroupSummary, path: Path) -> bool:
    losses = _balanced_losses(g.runs, "/conflict_fraction")
    if not losses:
        return False
    names = list(g.methods)
    fig, axes = _figure(2, len(losses), 4 * len(losses) + 1.5, 5.2)
    colors = _colors(len(names))
    any_data = False
    for j, loss in enumerate(losses):
        for i, (metric, ylabel, ylim) in enumerate((
            ("conflict_fraction", "fraction of task pairs in conflict", (-0.02, 1.02)),
            ("mean_cosine", "mean pairwise cosine", (-1.02, 1.02)),
        )):
            ax = axes[i, j]
            ax.set_ylim(*ylim)
            for color, name in zip(colors, names, strict=True):
                series = _metric_series([r for r in g.runs if r.label == name],
                                        f"{loss}/{metric}")
                if series is not None and series[1].ndim == 1:
                    any_data = True
                    ax.plot(series[0], series[1], color=color, lw=1.2, label=name,
                            **_points(len(series[0])))
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
            _steps_axis(ax)
            if i == 0:
                ax.set_title(f"{loss} gradients", fontsize=9)
            else:
                ax.set_xlabel("environment steps", fontsize=8)
            if j == 0:
                ax.set_ylabel(ylabel, fontsize=8)
    if not any_data:
        return False
    handles, labels = _fullest_legend(axes)
    fig.legend(handles, labels, loc="outside right center", fontsize=8)
    fig.suptitle(f"{g.benchmark}, {g.protocol}: gradient conflict between tasks (seed mean)",
                 fontsize=10)
    _save(fig, path)
    return True


# ====================================================================== entry point
def _rel(path: Path, root: Path) -> str:
    """``path`` relative to the report root (committed reports should not hold local paths)."""
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)



@dataclass
class Report:
    out_dir: Path
    groups: list[GroupSummary]
    skipped: list[tuple[Run, str]]  # unfinished runs (and runs that fit no group), with why
    files: list[Path]


def _unfinished_reason(run: Run) -> str:
    has_checkpoint = (run.path / "checkpoint.pt").exists()
    if run.result is not None:  # a result.json short of total_steps: extended, not done
        return (f"result.json at step {run.result.get('step')} < total_steps "
                f"{run.config.get('total_steps')}: extended, not finished"
                + (" (resume it)" if has_checkpoint else "; no checkpoint"))
    if (run.path / "result.json").exists():
        return "result.json cannot be read" + (" (resume it: the run writes it again)"
                                               if has_checkpoint else "; no checkpoint")
    if has_checkpoint:
        return "checkpoint, no result.json (resume it)"
    return "no checkpoint, no result.json"


def write_report(
    root: str | Path,
    out_dir: str | Path | None = None,
    reps: int = DEFAULT_REPS,
    poi_reps: int = DEFAULT_POI_REPS,
    seed: int = 0,
    plots: bool = True,
) -> Report:
    """Read every run below ``root``; write results.csv, summary.md/json and plots."""
    root = Path(root)
    out = Path(out_dir) if out_dir is not None else root
    bad = [f"--{name} {value}" for name, value in (("reps", reps), ("poi-reps", poi_reps))
           if value < 1]
    if bad:
        raise ReportError(f"bootstrap repetitions must be >= 1, got {', '.join(bad)}")
    runs = load_runs(root)
    if not runs:
        raise ReportError(f"no run directories (folders with config.json) below {str(root)!r}")
    malformed = [(r, why) for r in runs if (why := r.problem)]
    runs_ok = [r for r in runs if not r.problem]
    finished = [r for r in runs_ok if r.finished]
    incomplete = [r for r in runs_ok if not r.finished]
    skipped: list[tuple[Run, str]] = [(r, _unfinished_reason(r)) for r in incomplete]
    skipped += malformed
    # One group per benchmark, protocol and task list (custom benchmarks may differ)
    keys = sorted({(r.benchmark, r.protocol, tuple(r.task_names)) for r in finished
                   if r.task_names})
    groups: list[GroupSummary] = []
    for r in finished:
        if not r.task_names:
            skipped.append((r, "no task list (config.json names none and no evaluation "
                               "was logged)"))
    for bench, proto, tasks in keys:
        members, seen = [], {}
        for r in finished:
            if (r.benchmark, r.protocol, tuple(r.task_names)) != (bench, proto, tasks):
                continue
            missing = [t for t, v in zip(tasks, r.final_scores(tasks), strict=True)
                       if not math.isfinite(v)]
            if missing or r.final_eval is None:
                skipped.append((r, "final evaluation has no success value for task(s) "
                                   f"{', '.join(missing) or 'all'}"))
            elif (r.label, r.seed) in seen:  # two runs of one seed would count twice
                first = _rel(seen[(r.label, r.seed)], root)
                skipped.append((r, f"same balancer and seed as {first} (report one "
                                   "experiment per folder)"))
            else:
                seen[(r.label, r.seed)] = r.path
                members.append(r)
        if not members:
            continue
        g = summarize_group(members, reps=reps, poi_reps=poi_reps, seed=seed)
        if sum(k[:2] == (bench, proto) for k in keys) > 1:
            digest = hashlib.sha1(",".join(tasks).encode()).hexdigest()[:6]
            g.tag = f"{len(tasks)}tasks_{digest}"
        groups.append(g)

    files: list[Path] = []
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"  # the runs in the statistics (no duplicates)
    atomic_write_text(csv_path, results_csv([r for g in groups for r in g.runs]))
    files.append(csv_path)

    md = ["# Benchmark report", "",
          f"{len(runs)} run(s) under `{root.name or root}`, {len(finished)} finished"
          + (f"; {len(skipped)} not in the statistics ({len(incomplete)} unfinished), "
             "listed at the end." if skipped else "."),
          ""]
    for g in groups:
        plot_files: dict[str, str] = {}
        if plots:
            candidates = (
                ("learning curves", "learning_curves", plot_learning_curves),
                ("final per-task success", "task_heatmap", plot_task_heatmap),
                ("balancer weights", "diagnostics_weights", plot_weights),
                ("gradient conflict", "diagnostics_conflict", plot_conflict),
            )
            for title, stem, fn in candidates:
                p = out / f"{stem}_{g.slug}.png"
                if fn(g, p) is not False:
                    plot_files[title] = p.name
                    files.append(p)
        md += group_markdown(g, reps, poi_reps, plot_files)
    if skipped:
        md += ["## Runs not in the statistics", ""]
        md += _table(("run directory", "balancer", "seed", "last logged step", "state"), (
            (_rel(r.path, root), r.label, "?" if r.seed is None else str(r.seed),
             str(max([x["step"] for x in r.metrics + r.evals], default=0)), why)
            for r, why in skipped
        ))
        md += [""]
    md_path = out / "summary.md"
    atomic_write_text(md_path, "\n".join(md))
    files.append(md_path)
    json_path = out / "summary.json"
    atomic_write_json(json_path, {
        "groups": [group_json(g) for g in groups],
        "runs_not_in_statistics": {_rel(r.path, root): why for r, why in skipped},
        "bootstrap_reps": reps,
        "poi_bootstrap_reps": poi_reps,
    })
    files.append(json_path)
    return Report(out, groups, skipped, files)
