"""The ``mtrl`` command: ``train``, ``eval``, ``balancers``, ``bench``, ``report``.

This is the only place that turns names into objects. Errors a user can cause print one
line starting with ``error:`` and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings
from pathlib import Path
from typing import Any

USAGE = """usage: mtrl <command> [options]

commands:
  train       train a multi-task SAC agent       (mtrl train --help)
  eval        evaluate a run or checkpoint       (mtrl eval --help)
  balancers   list registered balancers with hyper-parameters and defaults
  bench       train every (balancer, seed) pair, then report   (mtrl bench --help)
  report      statistics, tables and plots of a benchmark dir  (mtrl report --help)
"""


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    try:
        print(f"warning: {message}", file=file or sys.stderr)
    except OSError:  # stderr gone (closed terminal, dead pipe): nothing to tell
        pass


def _fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


# ---------------------------------------------------------------------- train
def _train(argv: list[str]) -> None:
    import tyro

    from mtrl.agents.sac import SACConfig
    from mtrl.config import (
        RESUME_MAY_CHANGE,
        TrainConfig,
        default_balance,
        load_preset,
        read_run_config,
    )

    pre = argparse.ArgumentParser(
        prog="mtrl train", add_help=False,
        usage="mtrl train [--config PRESET] [--resume RUN_DIR] [OPTIONS]  (all options: "
        "mtrl train --help)")
    pre.add_argument("--config", default=None)
    pre.add_argument("--resume", default=None, metavar="RUN_DIR")
    known, rest = pre.parse_known_args(argv)
    for option, value in (("--config", known.config), ("--resume", known.resume)):
        if value is not None and not value.strip():  # (an unset shell variable, say)
            _fail(f"{option} was given an empty value")
    if known.resume and not (Path(known.resume) / "config.json").is_file():
        _fail(f"cannot resume: {str(Path(known.resume) / 'config.json')!r} not found "
              f"(is {known.resume!r} a run dir?)")
    if known.config:
        base = load_preset(known.config)
        if known.resume:  # the run is where --resume says (a preset's run_dir may be old)
            base = dataclasses.replace(base, run_dir=str(known.resume))
    elif known.resume:  # the run's own settings, before the command-line overrides
        base, _ = read_run_config(Path(known.resume) / "config.json")
        base = dataclasses.replace(base, run_dir=str(known.resume))  # where it is now
    else:
        base = TrainConfig()
    # tyro turns a non-empty dict default into fixed per-key options (--balancer-kwargs.c),
    # so a preset's kwargs would change the option's syntax and could not be dropped when
    # --balancer picks another method: parse against an empty dict, then merge below.
    cfg = tyro.cli(
        TrainConfig,
        default=dataclasses.replace(base, balancer_kwargs={}),
        args=rest,
        prog="mtrl train",
        description="Train multi-task SAC. Options override --config PRESET (a JSON file or a "
        "name in configs/); --resume RUN_DIR continues a run from its checkpoint (with its "
        "saved config, or --config if given; only "
        + ", ".join(RESUME_MAY_CHANGE) + " may differ from the run's). "
        + (f"The preset's balancer_kwargs ({base.balancer_kwargs}) apply, with "
           "--balancer-kwargs KEY VALUE on top (the default shown for that option is "
           "empty); --balancer naming another method drops them. "
           if base.balancer_kwargs else ""),
    )
    if cfg.run_dir is not None and not cfg.run_dir.strip():
        _fail("--run-dir was given an empty value")  # (else the default, or a dir named " ")
    # tyro reads only True/False as booleans: the JSON spelling of presets and `mtrl bench
    # --set` (false) would reach the balancer as a non-empty, so truthy, string
    cfg = dataclasses.replace(cfg, balancer_kwargs={
        k: v.lower() == "true" if isinstance(v, str) and v.lower() in ("true", "false") else v
        for k, v in cfg.balancer_kwargs.items()})
    # the preset's (or resumed run's) kwargs belong to its balancer: kept, with the
    # command line's on top, for that balancer; dropped if --balancer chose another
    kept = base.balancer_kwargs
    if cfg.balancer != base.balancer:
        if kept:
            warnings.warn(
                f"--balancer {cfg.balancer} replaces {base.balancer}: the balancer_kwargs "
                f"given with it ({kept}) are dropped; set {cfg.balancer}'s with "
                "--balancer-kwargs KEY VALUE", stacklevel=2,
            )
        kept = {}
        # the balanced losses go with the method too (FAMO's: the critic only), unless
        # --sac.balance was given
        target = default_balance(cfg.balancer, cfg.balancer_kwargs)
        given = any(a.split("=")[0] == "--sac.balance" for a in rest)
        if known.resume and not given:  # a run made before this reset existed keeps its own
            saved, _ = read_run_config(Path(known.resume) / "config.json")
            given = saved.sac.balance == base.sac.balance
        if not given and base.sac.balance != target:
            why = ("" if target == SACConfig().balance else
                   f" for {cfg.balancer} (it needs non-negative task losses)")
            said = (f"--balancer {cfg.balancer} replaces {base.balancer}: its sac.balance "
                    f"{list(base.sac.balance)} is reset to" if known.config or known.resume
                    else "sac.balance is")
            warnings.warn(f"{said} the default {list(target)}{why}; set another with "
                          "--sac.balance", stacklevel=2)
            cfg = dataclasses.replace(cfg, sac=dataclasses.replace(cfg.sac, balance=target))
    cfg = dataclasses.replace(cfg, balancer_kwargs={**kept, **cfg.balancer_kwargs})
    if known.resume and Path(cfg.run_dir or "").resolve() != Path(known.resume).resolve():
        _fail("--resume and --run-dir must name the same directory")
    from mtrl.trainer import train

    result = train(cfg, resume=bool(known.resume))
    _print_outcome(lambda: _print_train_result(result), interrupted=result.interrupted)
    if result.interrupted:
        raise SystemExit(130)


def _print_outcome(show: Any, interrupted: bool) -> None:
    """Run ``show()`` (prints a command's result) and flush stdout.

    ``mtrl train ... | tee log``: Ctrl-C ends tee too, so after an interrupted run stdout
    may be a dead pipe; the checkpoint is written and the exit status must still say
    "interrupted" (130). A pipe is block-buffered, so a dead reader may only show at the
    flush, which therefore happens here and not at exit."""
    try:
        show()
        sys.stdout.flush()
    except BrokenPipeError:
        if not interrupted:
            raise
        _silence_stdout()


def _check_out_dir(option: str, path: str | None, create: bool = True) -> None:
    """Refuse an output directory that cannot be one before any work is done (an
    evaluation of minutes was lost at its end): empty, a file, or one that cannot be
    made. ``create``: make it now (the command writes there anyway); else only check
    that its nearest existing parent is a writable directory (``--dry-run``)."""
    if path is None:
        return
    if not path.strip():
        _fail(f"{option} was given an empty value")
    p = Path(path)
    if p.exists() and not p.is_dir():
        _fail(f"{option} {path!r} is a file, not a directory")
    if create:
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            _fail(f"{option} {path!r} cannot be created: {exc.strerror or exc}")
        return
    parent = p
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        _fail(f"{option} {path!r} cannot be written: {str(parent)!r} is not a writable "
              "directory")


def _silence_stdout() -> None:
    """Point stdout at /dev/null (its reader is gone), so the flush at exit cannot fail."""
    from mtrl.runtime import stream_to_devnull

    stream_to_devnull(sys.stdout)


def _print_train_result(result: Any) -> None:
    if result.already_finished:
        print(f"{result.run_dir} already finished at step {result.steps} (total_steps); "
              "nothing to do. Pass a larger --total-steps to train on.")
    if result.final_eval is not None:
        _print_success_table(result.final_eval)
    if not result.already_finished:
        state = "interrupted" if result.interrupted else "finished"
        print(f"{state} at step {result.steps}; run directory: {result.run_dir}")


def _print_success_table(record: dict[str, Any]) -> None:
    success, returns = record["success"], record["return"]
    width = max(len(t) for t in success) + 2
    print(f"\n{'task':<{width}}{'success':>9}{'return':>11}")
    for task in success:
        print(f"{task:<{width}}{success[task]:>9.2f}{returns[task]:>11.1f}")
    print(f"{'mean':<{width}}{record['mean_success']:>9.3f}"
          f"   ({record['protocol']} protocol, {record['episodes_per_task']} episode(s)/task, "
          f"step {record['step']})")


# ---------------------------------------------------------------------- eval
def _eval(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="mtrl eval",
        description="Evaluate a trained run and write eval_<step>.json/.csv "
        "(eval_<step>_<protocol>_<N>ep.* for another protocol or episode count than the "
        "run's own evaluation).",
    )
    parser.add_argument("path", help="run directory or checkpoint file")
    parser.add_argument("--episodes-per-task", type=int, default=None,
                        help="evaluation episodes per task (default: the run's own "
                        "evaluation's; with another --protocol, that protocol's: 1 for mtrl, "
                        "50 for metaworld-plus)")
    parser.add_argument("--protocol", choices=["mtrl", "metaworld-plus"], default=None,
                        help="evaluation protocol (default: the run's)")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when available), cpu, cuda, cuda:N or mps "
                        "(default: auto)")
    parser.add_argument("--out", default=None, help="output directory (default: the run dir)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar on stderr (shown by default: a metaworld-plus "
                        "evaluation takes minutes)")
    args = parser.parse_args(argv)
    if args.episodes_per_task is not None and args.episodes_per_task < 1:
        _fail("--episodes-per-task must be >= 1")
    # (made now only for a path that exists: a mistyped run path leaves no directory)
    if not args.path.strip():
        _fail("PATH was given an empty value")
    # checked, not made: a refused evaluation (bad device, not a run) leaves no directory
    _check_out_dir("--out", args.out, create=False)

    from mtrl.evaluate_run import evaluate_run

    record, written = evaluate_run(
        args.path, episodes_per_task=args.episodes_per_task, protocol=args.protocol,
        device=args.device, out_dir=args.out, progress=args.progress,
    )
    _print_success_table(record)
    for p in written:
        print(f"wrote {p}")


# ---------------------------------------------------------------------- balancers
def _balancers(argv: list[str]) -> None:
    import inspect

    from mtrl.balancers import get_class, hparam_defaults, names

    if argv in (["-h"], ["--help"]):
        print("usage: mtrl balancers\n\nList every registered balancer (plug-ins included) "
              "with its hyper-parameters, their defaults and a one-line summary.")
        return
    if argv:
        _fail(f"mtrl balancers takes no arguments, got {' '.join(argv)}")
    for name in names():
        try:
            cls = get_class(name)
        except ValueError as exc:
            print(f"{name:<14} (failed to load: {exc})")
            continue
        params = ", ".join(
            k if v is inspect.Parameter.empty else f"{k}={v!r}"
            for k, v in hparam_defaults(cls).items()
        )
        # the docstring's first paragraph (its first line alone may stop mid-sentence)
        summary = " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split())
        print(f"{name:<14} ({params})  {summary}")


# ---------------------------------------------------------------------- bench
def _bench(argv: list[str]) -> None:
    from mtrl.bench import BenchSpec, format_outcomes, run_bench
    from mtrl.report import DEFAULT_POI_REPS, DEFAULT_REPS

    parser = argparse.ArgumentParser(
        prog="mtrl bench",
        description="Train every (balancer, seed) pair as its own run in OUT/runs/<balancer>/"
        "seed<k>, then write the report to OUT. Rerunning the same command skips finished "
        "runs, resumes interrupted ones and starts the rest.",
    )
    parser.add_argument("--benchmark", default="MT10",
                        help="MT10, MT50, MT1, custom, toy (default: %(default)s)")
    parser.add_argument("--balancers", default="mean,cagrad,fairgrad,sdmgrad-os",
                        help="comma-separated balancer names (see `mtrl balancers`; default: "
                        "%(default)s)")
    parser.add_argument("--seeds", type=int, default=3,
                        help="number of seeds: 0..N-1 (default: %(default)s)")
    parser.add_argument("--steps", type=int, required=True,
                        help="vector-env steps per run (each adds one transition per task)")
    parser.add_argument("--protocol", default="mtrl", choices=["mtrl", "metaworld-plus"])
    parser.add_argument("--out", default=None,
                        help="output directory (default: benchmarks/<benchmark>-<protocol>)")
    parser.add_argument("--launcher", default="local", choices=["local", "ray"])
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: start a local Ray instance)")
    parser.add_argument("--workers", type=int, default=None,
                        help="parallel runs (default: CPU cores // threads-per-run)")
    parser.add_argument("--threads-per-run", type=int, default=1,
                        help="torch threads of each run (default: %(default)s)")
    parser.add_argument("--gpus-per-run", type=float, default=0.25,
                        help="GPU fraction per run when GPUs exist (0: runs use the CPU)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="config override with a JSON value, e.g. --set warmup_steps=100 "
                        "--set sac.hidden_sizes=[256,256] (repeatable)")
    parser.add_argument("--reps", type=int, default=DEFAULT_REPS,
                        help="bootstrap resamples for mean/IQM confidence intervals")
    parser.add_argument("--poi-reps", type=int, default=DEFAULT_POI_REPS,
                        help="bootstrap resamples for probability of improvement")
    parser.add_argument("--no-report", action="store_true", help="skip the report")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate and show what would run (skip/resume/start); launch nothing")
    args = parser.parse_args(argv)
    _check_out_dir("--out", args.out, create=False)  # (made by the bench once planned)
    out = args.out or f"benchmarks/{args.benchmark.lower()}-{args.protocol}"
    spec = BenchSpec(
        benchmark=args.benchmark, balancers=tuple(args.balancers.split(",")), seeds=args.seeds,
        steps=args.steps, protocol=args.protocol, out=Path(out), launcher=args.launcher,
        address=args.address, workers=args.workers, threads_per_run=args.threads_per_run,
        gpus_per_run=args.gpus_per_run, overrides=tuple(args.overrides),
        report=not args.no_report, reps=args.reps, poi_reps=args.poi_reps,
    )
    if args.dry_run:
        from mtrl.bench import format_plan, plan_runs

        print(format_plan(plan_runs(spec)))
        return
    result = run_bench(spec, progress=not args.no_progress)
    _print_outcome(lambda: print(format_outcomes(result)), interrupted=result.exit_code == 130)
    if result.exit_code == 130:
        raise SystemExit(130)
    if result.failed:
        _fail(f"{len(result.failed)} of {len(result.outcomes)} run(s) failed (see above)", code=1)
    if result.report_error:
        _fail(f"report not written: {result.report_error}", code=1)


# ---------------------------------------------------------------------- report
def _report(argv: list[str]) -> None:
    from mtrl.report import DEFAULT_POI_REPS, DEFAULT_REPS, write_report

    parser = argparse.ArgumentParser(
        prog="mtrl report",
        description="Read every run directory below DIR (folders with config.json) and write "
        "results.csv, summary.md, summary.json and PNG plots.",
    )
    parser.add_argument("dir", help="benchmark output directory (or any folder of runs)")
    parser.add_argument("--out", default=None, help="where to write (default: DIR)")
    parser.add_argument("--reps", type=int, default=DEFAULT_REPS,
                        help="bootstrap resamples for mean/IQM confidence intervals")
    parser.add_argument("--poi-reps", type=int, default=DEFAULT_POI_REPS,
                        help="bootstrap resamples for probability of improvement")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    if not args.dir.strip():
        _fail("DIR was given an empty value")
    if not Path(args.dir).is_dir():
        _fail(f"{args.dir!r} is not a directory")
    _check_out_dir("--out", args.out, create=False)  # (made by write_report)
    report = write_report(args.dir, out_dir=args.out, reps=args.reps, poi_reps=args.poi_reps,
                          plots=not args.no_plots)
    md = next(p for p in report.files if p.name == "summary.md")
    print(md.read_text())
    for p in report.files:
        print(f"wrote {p}")


#: What needs less memory, per command (the out-of-memory message's advice).
OOM_HINTS = {
    "train": "a run directory keeps its last checkpoint; smaller --batch-size, "
             "--buffer-capacity, --sac.hidden-sizes or --eval-episodes need less",
    "bench": "a run directory keeps its last checkpoint; smaller --set batch_size, "
             "buffer_capacity, sac.hidden_sizes or eval_episodes need less",
    "eval": "a smaller --episodes-per-task needs less",
    "report": "smaller --reps and --poi-reps need less",
}

COMMANDS = {"train": _train, "eval": _eval, "balancers": _balancers, "bench": _bench,
            "report": _report}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if sys.stderr is None:  # started with stderr closed (`2>&-`): the messages meant for
        # it go nowhere, not to stdout (where print(file=None) would put them)
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the process's lifetime
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        _fail(f"unknown command {command!r}; valid commands: {', '.join(COMMANDS)}")
    previous_show = warnings.showwarning
    warnings.showwarning = _show_warning  # "warning: ..." lines, no source excerpts
    try:
        _run(command, rest)
    finally:
        warnings.showwarning = previous_show


def _run(command: str, rest: list[str]) -> None:
    # (imported here, after main() took over warnings: modules that warn on import, such
    # as mtrl.onednn about MTRL_ONEDNN, then warn in the "warning: ..." form too)
    from mtrl.checkpoint import CheckpointError
    from mtrl.config import ConfigError
    from mtrl.trainer import TrainingError

    try:
        COMMANDS[command](rest)
        sys.stdout.flush()  # a dead pipe shows here (exit 1, below), not as a traceback at exit
    except KeyboardInterrupt:  # outside the training loop (which checkpoints and returns):
        # building environments, evaluating, loading. The output may have no reader left
        # (`... | tee log`, whose tee the same Ctrl-C stopped): the status is 130 all the same
        from mtrl.progress import status

        status("interrupted")
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            _silence_stdout()
        raise SystemExit(130) from None
    except OSError as exc:
        # A file the command could not read or write (a full disk, a failing drive,
        # permissions) is reported in one line; when stdout/stderr themselves are gone (a
        # pipe into an exited process, a closed terminal) there is no one to tell.
        if isinstance(exc, BrokenPipeError):
            _silence_stdout()  # so the flush at exit does not fail again
        else:
            try:
                print(f"error: {exc}", file=sys.stderr, flush=True)
            except OSError:
                pass
        raise SystemExit(1) from None
    except (ConfigError, CheckpointError) as exc:
        _fail(str(exc))
    except TrainingError as exc:
        _fail(str(exc), code=1)
    except ArithmeticError as exc:  # e.g. a plug-in balancer returning NaN weights
        _fail(f"{type(exc).__name__}: {exc}", code=1)
    except (MemoryError, RuntimeError) as exc:
        from mtrl.runtime import first_line, out_of_memory

        if not out_of_memory(exc):
            raise
        hint = OOM_HINTS.get(command, OOM_HINTS["train"])
        _fail(f"out of memory: {first_line(exc)} ({hint})", code=1)
    except ValueError as exc:  # bad values surfacing from dataclass/env validation
        _fail(str(exc))


if __name__ == "__main__":
    main()
