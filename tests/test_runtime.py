"""CPU Gramians (oneDNN, NumPy syrk and torch paths) and the process-wide CPU settings."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from mtrl import onednn
from mtrl.balancers.base import gramian, gramian_of_blocks
from mtrl.runtime import configure_cpu


@pytest.fixture
def threads():
    """Set torch's thread count for one test and restore it afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture(params=["onednn", "torch"])
def backend(request):
    """Run a test with mtrl.onednn's products on, then off (restored afterwards)."""
    on = onednn.set_enabled(request.param == "onednn")
    if on != (request.param == "onednn"):
        pytest.skip("oneDNN not available")
    yield request.param
    onednn.set_enabled(True)


def _blocks(dtype=torch.float64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(5, d, generator=gen, dtype=dtype) for d in (7, 1, 300, 64)]


@pytest.mark.parametrize("num_threads", [1, 2], ids=["1-thread", "2-threads"])
def test_gramian_of_blocks_equals_gramian_of_the_concatenation(threads, num_threads, backend):
    threads(num_threads)
    blocks = _blocks()
    full = torch.cat(blocks, 1)
    expected = full @ full.T
    got = gramian_of_blocks(blocks)
    assert got.dtype == torch.float64 and got.device.type == "cpu"
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got, got.T, atol=0, rtol=0)  # exactly symmetric
    torch.testing.assert_close(gramian(full), expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("num_threads", [1, 2], ids=["1-thread", "2-threads"])
def test_gramian_of_blocks_dtypes(threads, num_threads, backend):
    threads(num_threads)
    b32 = _blocks(torch.float32)
    ref = torch.cat([b.double() for b in b32], 1)
    ref = ref @ ref.T
    # float32 blocks: float32 products, float64 result
    torch.testing.assert_close(gramian_of_blocks(b32), ref, atol=1e-3, rtol=1e-5)
    # a float32 / float64 mix runs in float64: exact to float64 rounding
    mixed = [b32[0].double(), *b32[1:]]
    torch.testing.assert_close(gramian_of_blocks(mixed), ref, atol=1e-10, rtol=1e-12)
    # half precision is promoted to float32, never computed in half
    half = [b.to(torch.bfloat16) for b in b32]
    ref_h = torch.cat([b.double() for b in half], 1)
    torch.testing.assert_close(gramian_of_blocks(half), ref_h @ ref_h.T, atol=1e-2, rtol=1e-5)
    # inputs that require grad are fine (detached)
    g = gramian_of_blocks([b32[2].requires_grad_()])
    assert not g.requires_grad


def test_gramian_of_blocks_non_contiguous_block(threads):
    threads(1)
    base = torch.randn(40, 6, dtype=torch.float64)
    block = base.T  # (6, 40), transposed strides
    torch.testing.assert_close(gramian_of_blocks([block]), block @ block.T)


def test_gramian_of_blocks_rejects_no_blocks():
    with pytest.raises(ValueError, match="at least one block"):
        gramian_of_blocks([])


def test_configure_cpu_rejects_zero_threads():
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        configure_cpu(0)


_CHILD = r"""
import ctypes, json, resource, sys, torch
from threadpoolctl import threadpool_info
from mtrl.runtime import configure_cpu

libc = ctypes.CDLL("libc.so.6") if sys.platform == "linux" else None
if libc is not None:
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]

def faults_per_cycle(mb=16, blocks=4, warm=3, timed=5):
    # minor page faults per cycle (malloc and touch `blocks` blocks, free them all), in
    # the steady state: the pattern of the per-task gradient blocks of an update
    if libc is None:
        return 0.0
    size = mb << 20
    for i in range(warm + timed):
        if i == warm:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        ptrs = [libc.malloc(size) for _ in range(blocks)]
        for p in ptrs:
            ctypes.memset(p, 1, size)
        for p in reversed(ptrs):
            libc.free(p)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / timed

untuned = faults_per_cycle()
note = configure_cpu(1)
tuned = faults_per_cycle()
blas = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
print(json.dumps({"note": note, "torch": torch.get_num_threads(), "blas": blas,
                  "untuned": untuned, "tuned": tuned, "glibc": sys.platform == "linux"}))
"""


def test_configure_cpu_sets_both_thread_pools_and_keeps_freed_memory():
    """In a child process: the settings are process-wide."""
    out = subprocess.run(
        [sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=120, check=True
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["torch"] == 1
    assert res["blas"] and all(n == 1 for n in res["blas"])  # NumPy's OpenBLAS at least
    assert res["note"].startswith("1 thread(s) for torch and BLAS")
    if res["glibc"]:
        assert res["note"].endswith("freed memory kept")
        # 4 x 16 MiB is 16,384 pages: by default glibc trims the heap once 32 MiB are free
        # and faults (part of) them in again on every cycle
        assert res["untuned"] > 1_000
        assert res["tuned"] < 100


# ---------------------------------------------------------------- run directory lock
def test_run_dir_lock_is_exclusive_and_leaves_no_trace(tmp_path):
    from mtrl.runtime import LOCK_NAME, RunDirBusy, run_dir_lock

    run = tmp_path / "a" / "b" / "run"
    with run_dir_lock(run):
        assert (run / LOCK_NAME).is_file()
        with pytest.raises(RunDirBusy), run_dir_lock(run):  # flock: per open file
            pass
        assert (run / LOCK_NAME).is_file()  # the refused one did not remove the holder's
    assert not (tmp_path / "a").exists()  # made for the lock, left empty: removed
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    with run_dir_lock(run):
        pass
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]


def test_run_dir_lock_is_not_kept_by_forked_children(tmp_path):
    """An async vector env's workers are forked from the trainer: they shared the lock and
    kept the run locked after the trainer died, as long as they lived."""
    import os
    import signal

    from mtrl.runtime import RunDirBusy, run_dir_lock

    run = tmp_path / "run"
    code = (
        "import os, sys, time\n"
        "from pathlib import Path\n"
        "from mtrl.runtime import run_dir_lock\n"
        "with run_dir_lock(Path(sys.argv[1])):\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(60)\n"
        "        os._exit(0)\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirBusy), run_dir_lock(run):
            pass
        proc.kill()  # the trainer dies; its forked child lives on
        proc.wait(timeout=10)
        with run_dir_lock(run):  # free at once
            pass
    finally:
        os.killpg(proc.pid, signal.SIGKILL)


def test_run_dir_lock_takes_the_new_file_when_its_holder_removed_it(tmp_path, monkeypatch):
    """A process that opened the lock file just before its holder removed it (on leaving)
    must not lock the removed file while a third process locks the new one."""
    import os

    import mtrl.runtime
    from mtrl.runtime import LOCK_NAME, run_dir_lock

    run = tmp_path / "run"
    run.mkdir()
    real_open = os.open
    opened = []

    def open_then_lose_it(path, flags, mode=0o777):
        fd = real_open(path, flags, mode)
        if not opened:  # the holder removes the file right after this open
            os.unlink(path)
        opened.append(fd)
        return fd

    monkeypatch.setattr(mtrl.runtime.os, "open", open_then_lose_it)
    with run_dir_lock(run):
        assert len(opened) == 2  # the removed file was given up, the new one locked
        assert os.path.samestat(os.fstat(opened[1]), os.stat(run / LOCK_NAME))


def test_a_file_system_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch):
    import errno
    import fcntl

    from mtrl.runtime import run_dir_lock

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="cannot lock run directory .*No locks available.*"
                      "going on without the lock"), run_dir_lock(tmp_path / "run"):
        pass
