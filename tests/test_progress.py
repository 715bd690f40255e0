"""Progress output: a tqdm bar on a terminal, plain lines elsewhere."""

import mtrl.progress
from mtrl.progress import Progress


def _progress(monkeypatch, capsys, interval: float, initial: int = 40) -> Progress:
    monkeypatch.setattr(Progress, "LINE_INTERVAL_S", interval)
    capsys.readouterr()
    return Progress(100, initial)


def test_progress_off_a_terminal_is_plain_lines_not_redrawn_frames(monkeypatch, capsys):
    """Under nohup or ``2> log`` tqdm's redrawn bar wrote a carriage-return frame ~10
    times a second into the log (28 KB for a 35 s toy run); there the progress is one
    line per interval, with the step, rate and the latest postfix."""
    bar = _progress(monkeypatch, capsys, interval=0.0)  # (capsys: stderr is no terminal)
    assert capsys.readouterr().err == ""  # nothing drawn at the start
    bar.update(1)
    bar.set_postfix(env_sps="496", success="0.50")
    bar.update(2)
    bar.write("interrupted: checkpoint written")
    bar.close()
    out = capsys.readouterr()
    lines = out.err.split("\n")
    assert "\r" not in out.err and lines[-1] == ""
    assert [line.split(" steps")[0] for line in lines[:-1]] == ["41/100", "43/100"]
    assert lines[0].startswith("41/100 steps (41%) [") and "step/s" in lines[0]
    assert "success" not in lines[0] and lines[1].endswith(", env_sps=496, success=0.50]")
    assert out.out == "interrupted: checkpoint written\n"


def test_progress_lines_come_once_per_interval_and_at_close(monkeypatch, capsys):
    bar = _progress(monkeypatch, capsys, interval=3600.0, initial=0)
    for _ in range(50):
        bar.update(1)
    assert capsys.readouterr().err == ""
    bar.close()
    assert capsys.readouterr().err.startswith("50/100 steps (50%) [")


def test_progress_on_a_terminal_is_tqdms_bar(monkeypatch, capsys):
    monkeypatch.setattr(mtrl.progress, "_isatty", lambda stream: True)
    bar = _progress(monkeypatch, capsys, interval=0.0)
    bar.update(1)
    bar.close()
    err = capsys.readouterr().err
    assert err.startswith("\r") and "41/100" in err and "|" in err  # (redrawn, with a bar)


def test_the_bench_progress_is_a_line_per_finished_run_off_a_terminal(capsys):
    from mtrl.bench import _Progress

    progress = _Progress(total=3, initial=1)
    progress.update({"status": "done", "balancer": "mean", "seed": 0})
    progress.update({"status": "failed", "balancer": "cagrad", "seed": 1,
                     "error": "boom\nmore", "log": "runs/x/train.log"})
    progress.close()
    out = capsys.readouterr()
    assert out.out == "FAILED cagrad seed 1: boom (log: runs/x/train.log)\n"
    lines = out.err.splitlines()
    assert "\r" not in out.err and [line.split(" runs")[0] for line in lines] == [
        "bench: 2/3", "bench: 3/3"]  # (no repeated last line at close)
    assert lines[0].endswith("failed=0]") and lines[1].endswith("failed=1]")


def test_without_progress_the_bench_still_prints_failed_runs(capsys):
    from mtrl.bench import _Progress

    progress = _Progress(total=1, initial=0, enabled=False)
    progress.update({"status": "failed", "balancer": "mean", "seed": 0, "error": "x",
                     "log": "l"})
    progress.write("interrupted")
    progress.close()
    out = capsys.readouterr()
    assert (out.out, out.err) == ("FAILED mean seed 0: x (log: l)\ninterrupted\n", "")


def test_a_transient_bar_off_a_terminal_writes_no_closing_line(monkeypatch, capsys):
    """An evaluation inside a training run: its bar must not add a line to the log at
    every evaluation (one that lasts less than the interval writes nothing)."""
    monkeypatch.setattr(Progress, "LINE_INTERVAL_S", 3600.0)
    for transient, expected in ((True, ""), (False, "eval: 5/10 steps (50%) [")):
        bar = Progress(10, desc="eval", transient=transient)
        bar.update(5)
        bar.close()
        assert capsys.readouterr().err[:len(expected) or None] == expected
