"""Progress output that suits where stderr goes, and never stops the work it reports."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["Progress", "evaluation_progress", "status"]


class Progress:
    """Progress on stderr that can never stop the work it reports: when stderr goes away
    (a closed terminal, or ``mtrl train ... | tee log`` whose ``tee`` died with the same
    Ctrl-C) a write raises ``BrokenPipeError`` / ``OSError``, which used to abort the
    training loop before it wrote the interrupt checkpoint. After the first failed write
    it is silent, and a dead pipe or terminal behind stderr is pointed at /dev/null, so
    that the flush at exit does not fail too (exit status 120).

    On a terminal (or in an IPython kernel: a notebook, qtconsole, Spyder) it is a tqdm
    bar. Where stderr is not a terminal (``nohup``, ``2> log``, a batch job) a redrawn bar
    fills the log with carriage-return frames (~1 KB/s for ``mtrl train``), so it writes
    plain lines instead: tqdm's meter text without the bar (the rate is the session's
    average), one when it starts, then at most one every ``line_interval_s`` seconds
    (default :data:`LINE_INTERVAL_S`), and on close a last one unless the previous line
    showed the same count. ``enabled=False`` or ``TQDM_DISABLE=1`` silences both forms.
    :meth:`write` prints a message line on stdout, flushed (in order with the progress
    lines in a shared log), also when the progress is silent."""

    #: Default seconds between two progress lines when stderr is not a terminal.
    LINE_INTERVAL_S = 60.0
    #: A ``transient`` bar (e.g. an evaluation inside a training run) appears only after
    #: this many seconds, and is removed when closed; off a terminal it writes neither the
    #: first nor the closing line (only its interval lines, if it lasts that long).
    TRANSIENT_DELAY_S = 3.0

    def __init__(self, total: int, initial: int = 0, *, unit: str = "step", desc: str = "",
                 line_interval_s: float | None = None, transient: bool = False,
                 enabled: bool = True) -> None:
        from tqdm.auto import tqdm
        from tqdm.autonotebook import tqdm as plain_or_notebook

        # IPython front ends draw tqdm's bar in place, though their stderr is no terminal
        in_kernel = plain_or_notebook.__module__ == "tqdm.notebook" or "ipykernel" in sys.modules
        self._lines = not in_kernel and not _isatty(sys.stderr)
        self._interval = self.LINE_INTERVAL_S if line_interval_s is None else line_interval_s
        self._transient = transient
        self._next_line = time.monotonic() + self._interval
        self._line_at: int | None = None  # the count the last line showed
        self._bar: Any = None
        if not enabled or sys.stderr is None:  # (None: started with stderr closed)
            return
        try:  # (a terminal bar draws its first frame here)
            bar = tqdm(
                total=total, initial=initial, unit=unit, desc=desc or None, dynamic_ncols=True,
                # transient: shown only after TRANSIENT_DELAY_S, and gone once closed
                leave=not transient, delay=self.TRANSIENT_DELAY_S if transient else 0.0,
                # in line mode tqdm only counts and formats; this class prints its lines
                file=_Discard() if self._lines else sys.stderr,
                mininterval=math.inf if self._lines else 0.1,
                bar_format=(f"{desc}: " if desc else "") + _LINE_FORMAT if self._lines else None,
            )
        except _STREAM_ERRORS:
            _silence_stderr()
            return
        if bar.disable:  # TQDM_DISABLE=1 (tqdm takes TQDM_* variables as defaults)
            return
        self._bar = bar
        if self._lines and not transient:  # the log shows that the work started, and where
            self._guarded(self._print_line)

    def _guarded(self, action: Callable[[Any], None]) -> None:
        if self._bar is None:
            return
        try:
            action(self._bar)
        except _STREAM_ERRORS:
            self._bar.disable = True  # tqdm writes nothing more, even on close
            self._bar = None
            _silence_stderr()

    def _print_line(self, bar: Any) -> None:
        sys.stderr.write(f"{bar}\n")
        sys.stderr.flush()
        self._next_line = time.monotonic() + self._interval
        self._line_at = bar.n

    def update(self, n: int = 1) -> None:
        def advance(bar: Any) -> None:
            bar.update(n)
            if self._lines and time.monotonic() >= self._next_line:
                self._print_line(bar)

        self._guarded(advance)

    def set_postfix(self, **kwargs: Any) -> None:
        self._guarded(lambda bar: bar.set_postfix(**kwargs))

    def write(self, text: str) -> None:
        """Print ``text`` as a line on stdout (on a terminal, above the bar)."""
        try:
            if self._bar is not None and not self._lines:
                self._bar.write(text)  # (tqdm clears the bar, prints on stdout, redraws it)
            else:
                print(text)
            sys.stdout.flush()
        except _STREAM_ERRORS:
            # stdout (or, clearing the bar, stderr) is gone: stdout's owner finds out at
            # its next write or flush, and the bar at its own next write
            pass

    def close(self) -> None:
        if (self._lines and not self._transient and self._bar is not None
                and self._bar.n != self._line_at):
            self._guarded(self._print_line)
        self._guarded(lambda bar: bar.close())


def status(text: str) -> None:
    """A line on stderr about slow work that has no count to show (building MT50's
    environments takes ~25 s); never raises."""
    if sys.stderr is None:  # started with stderr closed (print(file=None) means stdout)
        return
    try:
        print(text, file=sys.stderr, flush=True)
    except _STREAM_ERRORS:  # its reader is gone: the unwritten line must not fail the exit
        _silence_stderr()


@contextlib.contextmanager
def evaluation_progress(episodes_per_task: int, max_episode_steps: int,
                        enabled: bool = True) -> Iterator[Callable[[], None]]:
    """A transient bar over the vector-env steps of an evaluation (its episodes run to
    their time limit: ``episodes_per_task × max_episode_steps`` steps); yields its
    ``update`` for :func:`mtrl.envs.evaluate`'s ``on_step`` (silent if not ``enabled``)."""
    bar = Progress(episodes_per_task * max_episode_steps, unit="step", desc="eval",
                   transient=True, enabled=enabled)
    try:
        yield bar.update
    finally:
        bar.close()


#: The progress line when stderr is not a terminal: tqdm's meter without the bar.
_LINE_FORMAT = (
    "{n_fmt}/{total_fmt} {unit}s ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
)


class _Discard:
    """A text stream that drops what it is given (the line-mode tqdm's file)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


#: What a write to a stream that went away raises: OSError (a dead pipe, a lost terminal),
#: ValueError (the stream was closed).
_STREAM_ERRORS = (OSError, ValueError)


def _silence_stderr() -> None:
    """Point stderr at /dev/null when its reader is gone (a pipe or terminal; a log file
    stays), so that the bytes left in its buffer do not fail the flush at exit."""
    from mtrl.runtime import stream_to_devnull

    stream_to_devnull(sys.stderr, keep_files=True)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (*_STREAM_ERRORS, AttributeError):  # (AttributeError: stream is None)
        return False
