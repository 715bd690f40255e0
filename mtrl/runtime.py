"""Process-wide CPU settings for a training, evaluation or benchmark process.

Only entry points call this (the trainer, ``mtrl eval``, the benchmark scripts), never
library code: it changes state shared by the whole process.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import signal
import stat
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from threadpoolctl import ThreadpoolController

__all__ = [
    "configure_cpu", "first_line", "install_stop_handlers", "on_hangup", "out_of_memory",
    "restore_handlers", "stream_to_devnull", "to_devnull",
]

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's upper bound on 64-bit

_tuned_malloc: bool | None = None


def configure_cpu(threads: int, *, keep_freed_memory: bool = True) -> str:
    """Use ``threads`` CPU threads everywhere, and stop large freed blocks going back to
    the OS. Returns a one-line description of what was set.

    * torch's intra-op pool and the BLAS that NumPy / SciPy load (OpenBLAS: the
      balancers' K×K solves, and the CPU Gramians when oneDNN is off, see
      :func:`mtrl.balancers.base.gramian_of_blocks`) both get ``threads``: two pools of
      the default size, one per core each, oversubscribe a small machine.
    * ``keep_freed_memory`` (glibc only): glibc starts with a 128 KiB ``mmap`` threshold,
      raises it only after an mmapped block is freed, and hands the top of the heap back
      to the OS once twice that threshold is free. The per-task gradient blocks of a
      balanced update (up to 30.5 MiB each for a 400×400 layer at K = 50, ~215 MB per
      update in all) are then mapped and zero-filled afresh again and again: one page
      fault per 4 KiB. Here the threshold is fixed at glibc's maximum (32 MiB) and the
      heap is never trimmed, so blocks up to 32 MiB are reused from the heap; larger
      ones are still mapped afresh. The process keeps its peak heap instead of
      returning it. Measured with ``scripts/bench_update.py`` at K = 50: a CAGrad update
      259 ms / 0.74 M page faults for the whole run by default, 188 ms / 0.14 M with
      this; same peak resident memory (~630 MB). Idempotent; not undone within the
      process.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    ThreadpoolController().select(user_api="blas").limit(limits=threads)
    parts = [f"{threads} thread(s) for torch and BLAS"]
    if keep_freed_memory:
        parts.append("freed memory kept" if _keep_freed_memory() else "allocator unchanged")
    return ", ".join(parts)


def _keep_freed_memory() -> bool:
    global _tuned_malloc
    if _tuned_malloc is None:
        _tuned_malloc = False
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL("libc.so.6")
            except OSError:
                return False
            _tuned_malloc = bool(
                libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
                and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
            )
    return _tuned_malloc


def install_stop_handlers(
    handler: Callable[[int, Any], None], names: tuple[str, ...] = ("SIGINT", "SIGTERM", "SIGHUP")
) -> dict[int, Any]:
    """``handler`` for the named signals; returns the previous handlers (for
    :func:`restore_handlers`). SIGHUP only while it has its default action: under ``nohup``
    (ignored) a lost terminal goes on being ignored. Outside the main thread (a worker)
    nothing is installed: signals keep their handling there."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for name in names:
        signum = getattr(signal, name, None)
        if signum is None or (name == "SIGHUP" and signal.getsignal(signum) is not signal.SIG_DFL):
            continue
        previous[signum] = signal.signal(signum, handler)
    return previous


def restore_handlers(previous: dict[int, Any]) -> None:
    """Put back what :func:`install_stop_handlers` replaced."""
    for signum, handler in previous.items():
        if handler is not None:  # (None: set outside Python; cannot be restored)
            signal.signal(signum, handler)


def on_hangup() -> None:
    """Call from a SIGHUP handler: the terminal is gone.

    A hangup often comes twice (the shell forwards one, the kernel sends another when the
    shell exits): further SIGHUPs are ignored, so the second is not taken for "interrupt
    again, stop at once". Writes to the lost terminal (or a dead pipe) would fail with
    EIO / EPIPE and abort the clean stop, so stdout and stderr go to /dev/null unless
    they are regular files (a log keeps its output).
    """
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    to_devnull((1, 2), keep_files=True)


def to_devnull(fds: Sequence[int], keep_files: bool = False) -> None:
    """Point the file descriptors ``fds`` at /dev/null: their reader is gone (a lost
    terminal, a pipe into an exited process), and a write or the flush at exit would fail.
    With ``keep_files`` a descriptor open on a regular file (a log) keeps it."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in fds:
            try:
                if keep_files and stat.S_ISREG(os.fstat(fd).st_mode):
                    continue
            except OSError:
                pass
            os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def stream_to_devnull(stream: Any, keep_files: bool = False) -> None:
    """:func:`to_devnull` for the descriptor behind a Python stream (``sys.stdout``,
    ``sys.stderr``); nothing if it has none (a test's capture, ``None``) or the
    redirection fails."""
    try:
        to_devnull((stream.fileno(),), keep_files=keep_files)
    except (OSError, ValueError, AttributeError):  # (ValueError: closed or no descriptor)
        pass


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def whole_message(exc: BaseException, limit: int = 600) -> str:
    """An exception's whole message on one line (its lines joined), cut at ``limit``
    characters: for messages whose useful part is not the first line (``load_state_dict``
    names the missing and unexpected keys after a heading)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    text = text or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says memory ran out: NumPy's (``MemoryError``), torch's on an
    accelerator (``torch.OutOfMemoryError``) or on the CPU (a ``RuntimeError`` from its
    allocator)."""
    if isinstance(exc, MemoryError):
        return True
    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text
                                              or "out of memory" in text)


# ---------------------------------------------------------------- one process per run dir
class RunDirBusy(Exception):
    """Another process holds the run directory's lock (see :func:`run_dir_lock`)."""


#: Name of the lock file in a run directory while a process trains there.
LOCK_NAME = ".lock"
_HELD_LOCKS: set[int] = set()  # file descriptors of the locks this process holds


def _drop_locks_in_child() -> None:
    # A forked child (an env worker of an async vector env) shares the lock's open file;
    # a child that outlived the trainer would keep the run locked. Closing the child's
    # descriptors (no LOCK_UN: that would release the parent's lock) leaves it to the parent.
    for fd in list(_HELD_LOCKS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_locks_in_child)


def _missing_dirs(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


@contextlib.contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the ``with`` block; raise :class:`RunDirBusy` at once if
    another process holds it.

    The lock is an exclusive ``flock`` of ``run_dir/.lock`` (Unix; a file opened for
    writing, which NFS's emulation of ``flock`` needs). The OS releases it however the
    process ends, SIGKILL included, and forked children do not keep it. The directory
    (and missing parents) is made for the lock and removed again if it is left empty; the
    lock file is removed when the block ends (a process that opened the old file then
    sees it is gone and retries). Where locking is not supported (no ``fcntl``, a file
    system without ``flock``) the block runs without the lock, with a warning for the
    latter.
    """
    made = _missing_dirs(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not Unix: no lock
        fcntl = None
    path = run_dir / LOCK_NAME
    fd = None
    for _ in range(100) if fcntl is not None else ():
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirBusy(str(run_dir)) from None
        except OSError as exc:  # e.g. ENOLCK / ENOSYS: this file system cannot lock
            os.close(fd)
            fd = None
            warnings.warn(f"cannot lock run directory {str(run_dir)!r} ({exc}); going on "
                          "without the lock (make sure no other process trains there)",
                          stacklevel=3)
            break
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # locked a lock file its holder removed on leaving: take the new one
        fd = None
    if fd is not None:
        _HELD_LOCKS.add(fd)
    try:
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                path.unlink()  # (still holding the lock: see the docstring)
        for d in made:  # a run that wrote nothing leaves no trace
            try:
                d.rmdir()
            except OSError:
                break
        if fd is not None:
            _HELD_LOCKS.discard(fd)
            os.close(fd)
