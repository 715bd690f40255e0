"""Progress output: a tqdm bar on a terminal, plain lines elsewhere."""

import pytest

import mtrl.progress
from mtrl.progress import Progress


def _progress(monkeypatch, capsys, interval: float, initial: int = 40) -> Progress:
    monkeypatch.setattr(Progress, "LINE_INTERVAL_S", interval)
    capsys.readouterr()
    return Progress(100, initial)


def test_progress_off_a_terminal_is_plain_lines_not_redrawn_frames(monkeypatch, capsys):
    """Under nohup or ``2> log`` tqdm's redrawn bar wrote a carriage-return frame ~10
    times a second into the log (28 KB for a 35 s toy run); there the progress is one
    line per interval, with the step, rate and the latest postfix, and one at the start
    (a resumed run's: where it starts)."""
    bar = _progress(monkeypatch, capsys, interval=0.0)  # (capsys: stderr is no terminal)
    assert capsys.readouterr().err.startswith("40/100 steps (40%) [00:00<?, ?step/s]\n")
    bar.update(1)
    bar.set_postfix(env_sps="496", success="0.50")
    bar.update(2)
    bar.write("interrupted: checkpoint written")
    bar.close()
    out = capsys.readouterr()
    lines = out.err.split("\n")
    assert "\r" not in out.err and lines[-1] == ""
    assert [line.split(" steps")[0] for line in lines[:-1]] == ["41/100", "43/100"]  # (no
    # repeated last line at close)
    assert lines[0].startswith("41/100 steps (41%) [") and "step/s" in lines[0]
    assert "success" not in lines[0] and lines[1].endswith(", env_sps=496, success=0.50]")
    assert out.out == "interrupted: checkpoint written\n"


def test_progress_lines_come_once_per_interval_and_at_close(monkeypatch, capsys):
    bar = _progress(monkeypatch, capsys, interval=3600.0, initial=0)
    assert capsys.readouterr().err.startswith("0/100 steps (0%) [")
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
        "bench: 1/3", "bench: 2/3", "bench: 3/3"]  # (no repeated last line at close)
    assert lines[1].endswith("failed=0]") and lines[2].endswith("failed=1]")


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
    for transient, expected in ((True, []), (False, ["eval: 0/10", "eval: 5/10"])):
        bar = Progress(10, desc="eval", transient=transient)
        bar.update(5)
        bar.close()
        lines = capsys.readouterr().err.splitlines()
        assert [line.split(" steps")[0] for line in lines] == expected


def test_tqdm_disable_silences_the_progress_but_not_the_messages():
    """TQDM_DISABLE=1 (tqdm reads TQDM_* variables at import, as defaults): off a
    terminal the lines went on, frozen at the start count and in tqdm's default format."""
    import os
    import subprocess
    import sys

    script = (
        "import mtrl.progress as p\n"
        "for terminal in (False, True):\n"
        "    p._isatty = lambda stream: terminal\n"
        "    bar = p.Progress(100, 40, line_interval_s=0.0)\n"
        "    bar.update(3)\n"
        "    bar.write('a message')\n"
        "    bar.close()\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1"}, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "a message\n" * 2, "")


def test_messages_are_flushed_in_order_with_the_progress_lines(monkeypatch):
    """``nohup mtrl bench > log 2>&1``: stdout to a file is block-buffered, so a FAILED
    line written with tqdm.write reached the log only at exit, after the progress lines
    (flushed at once) that counted it."""
    import io
    import sys

    log: list[str] = []

    class Stream(io.StringIO):
        def flush(self):
            if self.getvalue():
                log.append(self.getvalue())
                self.seek(0), self.truncate()

    monkeypatch.setattr(sys, "stdout", Stream())
    monkeypatch.setattr(sys, "stderr", Stream())
    monkeypatch.setattr(Progress, "LINE_INTERVAL_S", 0.0)
    bar = Progress(2, desc="bench", unit="run")
    bar.write("FAILED mean seed 0")
    bar.update(1)
    assert [entry.split(" runs")[0] for entry in log] == [
        "bench: 0/2", "FAILED mean seed 0\n", "bench: 1/2"]


class _Gone:
    """A stream whose reader has gone (``error``: what writing to it raises)."""

    def __init__(self, error: Exception):
        self.error = error

    def write(self, text):
        raise self.error

    def flush(self):
        raise self.error

    def isatty(self):
        return True


def test_progress_never_raises_when_stderr_is_gone(monkeypatch, capsys):
    """A dead pipe behind stderr when the bar is made (a terminal bar draws there), a
    closed stderr (ValueError), or none at all: the progress goes silent and says why
    nowhere; a dead stream is pointed at /dev/null so the flush at exit cannot fail."""
    import sys

    silenced = []
    monkeypatch.setattr(mtrl.progress, "_silence_stderr", lambda: silenced.append(True))
    for stream in (_Gone(BrokenPipeError(32, "Broken pipe")),
                   _Gone(ValueError("I/O operation on closed file.")), None):
        for terminal in (True, False):
            silenced.clear()
            monkeypatch.setattr(mtrl.progress, "_isatty", lambda s, t=terminal: t)
            monkeypatch.setattr(sys, "stderr", stream)
            bar = Progress(10, 2, line_interval_s=0.0)
            bar.update(1)
            bar.set_postfix(x=1)
            bar.write("still shown")
            bar.close()
            monkeypatch.setattr(sys, "stderr", sys.__stderr__)
            assert capsys.readouterr().out == "still shown\n"
            assert silenced == ([] if stream is None else [True])


def test_without_stderr_status_lines_and_cli_messages_stay_off_stdout(monkeypatch, capsys,
                                                                       tmp_path):
    """Started with stderr closed (``2>&-``), Python's sys.stderr is None and
    ``print(file=None)`` writes to stdout: "building the ... environments" and the CLI's
    error and warning lines went into stdout (a results file, say). Found by an audit."""
    import sys

    from mtrl.cli import main
    from mtrl.progress import status

    monkeypatch.setattr(sys, "stderr", None)
    status("building the toy environments ...")
    assert capsys.readouterr().out == ""
    with pytest.raises(SystemExit):
        main(["eval", str(tmp_path / "no-such-run")])
    assert capsys.readouterr().out == ""


def test_an_ipython_kernel_keeps_the_bar(monkeypatch, capsys):
    """qtconsole, Spyder or Jupyter without widgets: tqdm draws its plain bar there, and
    the kernel's stderr is no terminal; it stays a bar, not a line a minute."""
    import sys
    import types

    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    bar = _progress(monkeypatch, capsys, interval=3600.0)
    bar.update(1)
    bar.close()
    err = capsys.readouterr().err
    assert "\r" in err and "41/100" in err and "|" in err


def test_a_dead_stdout_leaves_the_bar_and_stderr_alone(monkeypatch, capsys):
    """A message to a stdout whose reader is gone is lost, but the progress on stderr
    goes on (before, the failure silenced the bar, and stderr would have gone to
    /dev/null for a fault of stdout's)."""
    import sys

    silenced = []
    monkeypatch.setattr(mtrl.progress, "_silence_stderr", lambda: silenced.append(True))
    for terminal in (True, False):
        monkeypatch.setattr(mtrl.progress, "_isatty", lambda s, t=terminal: t)
        bar = _progress(monkeypatch, capsys, interval=0.0)
        monkeypatch.setattr(sys, "stdout", _Gone(BrokenPipeError(32, "Broken pipe")))
        bar.write("lost")
        bar.update(1)
        bar.close()  # (on a terminal, the last frame; off it, a line)
        monkeypatch.setattr(sys, "stdout", sys.__stdout__)
        assert "41/100" in capsys.readouterr().err and silenced == []


def test_lines_are_at_least_the_interval_apart(monkeypatch, capsys):
    """(Mutation testing:) after each line the next is due an interval later, not at every
    update once the first interval has passed. Fake clock, 10 s interval, an update every
    4 s: lines at 0 (start), 12 and 24 s."""
    now = [0.0]
    monkeypatch.setattr(mtrl.progress.time, "monotonic", lambda: now[0])
    capsys.readouterr()
    bar = Progress(100, line_interval_s=10.0)
    for _ in range(6):
        now[0] += 4.0
        bar.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" steps")[0] for line in lines] == ["0/100", "3/100", "6/100"]


def test_a_transient_bar_on_a_terminal_waits_and_is_erased(monkeypatch, capsys):
    """An evaluation bar inside training: closed before TRANSIENT_DELAY_S it never shows;
    one that showed is erased when closed (no line left in the scrollback)."""
    import time
    from weakref import WeakSet

    from tqdm.std import tqdm

    monkeypatch.setattr(tqdm, "_instances", WeakSet())  # (bars left open by other tests
    # would move this one down a line)
    monkeypatch.setattr(mtrl.progress, "_isatty", lambda stream: True)
    capsys.readouterr()
    bar = Progress(10, desc="eval", transient=True)
    bar.update(5)
    bar.close()
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(Progress, "TRANSIENT_DELAY_S", 0.05)
    bar = Progress(10, desc="eval", transient=True)
    time.sleep(0.1)
    bar.update(5)
    bar.close()
    err = capsys.readouterr().err
    assert "eval" in err and "5/10" in err  # it showed
    assert "\n" not in err and err.endswith("\r")  # and was erased, not left


def test_a_log_file_on_stderr_is_kept_when_a_write_fails_elsewhere(tmp_path, monkeypatch):
    """_silence_stderr points a dead pipe or terminal at /dev/null, but a log file stays
    (`2> log`): later lines still reach it."""
    log = open(tmp_path / "log", "w")  # noqa: SIM115 - closed below
    monkeypatch.setattr(mtrl.progress.sys, "stderr", log)
    try:
        log.write("before\n")
        log.flush()
        mtrl.progress._silence_stderr()
        log.write("after\n")
        log.flush()
    finally:
        log.close()
    assert (tmp_path / "log").read_text() == "before\nafter\n"
