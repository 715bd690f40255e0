"""Atomic file writes and safe checkpoint loading (no pickled code is executed)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from mtrl.runtime import first_line


class CheckpointError(RuntimeError):
    """A checkpoint is missing or cannot be read; the message says which file and why."""


def _read_umask() -> int:
    """The process umask without changing it (``/proc/self/status`` on Linux); elsewhere
    ``os.umask`` is set and put back, which is safe only before threads start."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _read_umask()


def _umask_mode() -> int:
    """``0o666`` less the process umask: the mode ``open()`` would give a new file
    (``mkstemp`` makes its files ``0o600``, unreadable to a group sharing the runs). Read
    without touching the umask where the OS allows (threads write runs concurrently)."""
    mask = _read_umask() if os.path.exists("/proc/self/status") else _UMASK_AT_IMPORT
    return 0o666 & ~mask


def _new_temp_file(path: Path) -> tuple[int, str]:
    """A temp file beside ``path`` for an atomic write, named ``.<name>.<random>.tmp``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")


def remove_stale_temp_files(directory: Path, names: Iterable[str]) -> None:
    """Delete the temp files that atomic writes of ``names`` in ``directory`` left behind
    (a process killed mid-write). Only when no writer can be live, e.g. under a lock."""
    for name in names:
        for stale in directory.glob(f".{name}.*.tmp"):  # (as _new_temp_file names them)
            stale.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = _new_temp_file(path)
    try:
        os.chmod(tmp, _umask_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def read_json_object(path: str | Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; ``None`` when the file is missing or unreadable, is not
    JSON (cut short, binary garbage) or holds something else than an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):  # (ValueError: JSONDecodeError, UnicodeDecodeError)
        return None
    return data if isinstance(data, dict) else None


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temp file in the same folder, then rename over ``path``.

    A failed write leaves the previous checkpoint as it was and no temp file, and raises
    ``OSError`` naming the checkpoint and the free space on its disk (torch reports a full
    disk as ``RuntimeError: ... unexpected pos``, which says neither)."""
    path = Path(path)
    fd, tmp = _new_temp_file(path)
    os.close(fd)
    try:
        os.chmod(tmp, _umask_mode())
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        Path(tmp).unlink(missing_ok=True)
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2**20:,.0f} MiB free there"
        except OSError:
            free = "free space unknown"
        message = (f"could not write checkpoint {str(path)!r} ({free}; the previous "
                   f"checkpoint, if any, is kept): {first_line(exc)}")
        errno = getattr(exc, "errno", None)  # (OSError(None, m) would print "[Errno None]")
        raise (OSError(errno, message) if errno is not None else OSError(message)) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


#: Layout version of the checkpoints this mtrl writes; it reads versions 1..this.
CHECKPOINT_FORMAT = 1


def load_checkpoint(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    required: tuple[str, ...] = ("step", "agent"),
) -> dict[str, Any]:
    """Load with ``weights_only=True`` (no pickled code runs). Missing, corrupt, foreign,
    newer-format files, or files without the ``required`` keys raise CheckpointError."""
    path = Path(path)
    if not path.is_file():
        if path.is_symlink() and not path.exists():
            why = f"is a link to {os.readlink(path)!r}, which does not exist"
        else:
            why = "is not a file" if path.exists() else "does not exist"
        raise CheckpointError(f"checkpoint {str(path)!r} {why}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" in str(exc).lower():  # an object other than tensors and containers
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds objects other than tensors, numbers and "
                "containers; mtrl never unpickles code, so it will not load it"
            ) from exc
        # (torch's message advises weights_only=False: wrong for a file that is not a
        # checkpoint at all, and unsafe; not repeated)
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or not an mtrl checkpoint (torch's "
            "weights-only loader cannot read it)"
        ) from exc
    except EOFError as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is empty or truncated (a copy cut short?)"
        ) from exc
    except Exception as exc:  # truncated zip, wrong format, ...
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or not an mtrl checkpoint: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(f"checkpoint {str(path)!r} is not an mtrl checkpoint")
    fmt = state["format"]
    if not (isinstance(fmt, int) and 1 <= fmt <= CHECKPOINT_FORMAT):
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format {fmt!r}; this mtrl reads formats 1 to "
            f"{CHECKPOINT_FORMAT} (written by a newer mtrl? upgrade to resume or evaluate it)"
        )
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint {str(path)!r} lacks {', '.join(map(repr, missing))}; it is "
            "incomplete or not an mtrl training checkpoint"
        )
    step = state.get("step", 0)
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
        raise CheckpointError(f"checkpoint {str(path)!r} has step {step!r}, not a step count; "
                              "it is damaged or not an mtrl training checkpoint")
    return state
