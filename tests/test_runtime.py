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
