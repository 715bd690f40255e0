"""mtrl.runtime: thread pools, stop handlers and their restoration, /dev/null redirection
after a hangup, and the second stop signal."""

from __future__ import annotations

import signal

import pytest
import torch
from threadpoolctl import threadpool_info, threadpool_limits

from mtrl.runtime import configure_cpu, install_stop_handlers, restore_handlers


def test_configure_cpu_gives_both_pools_the_number_asked_for():
    """Not only 1 thread (the existing child-process test): with 2 asked for after both
    pools were set to 1, torch and every BLAS pool report 2. In-process, everything
    restored afterwards (``keep_freed_memory=False``: no allocator change)."""
    before = torch.get_num_threads()
    with threadpool_limits(limits=1, user_api="blas"):  # restores the BLAS pools on exit
        torch.set_num_threads(1)
        try:
            note = configure_cpu(2, keep_freed_memory=False)
            blas = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
            assert torch.get_num_threads() == 2
            assert blas and all(n == 2 for n in blas)
            assert note == "2 thread(s) for torch and BLAS"
        finally:
            torch.set_num_threads(before)


def test_stop_handlers_are_installed_and_put_back():
    """``install_stop_handlers`` replaces the named handlers and returns the old ones;
    ``restore_handlers`` puts exactly those back."""
    def handler(signum, frame):
        pass

    old_int, old_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    previous = install_stop_handlers(handler, ("SIGINT", "SIGTERM"))
    try:
        assert previous == {signal.SIGINT: old_int, signal.SIGTERM: old_term}
        assert signal.getsignal(signal.SIGINT) is handler
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        restore_handlers(previous)
    assert signal.getsignal(signal.SIGINT) is old_int
    assert signal.getsignal(signal.SIGTERM) is old_term


def test_to_devnull_keeps_regular_files_and_silences_pipes(tmp_path):
    """After a hangup stdout/stderr go to /dev/null unless they are regular files (a log
    keeps its output): with ``keep_files`` a file descriptor on a file still writes to the
    file, one on a pipe no longer reaches the pipe."""
    import os

    from mtrl.runtime import to_devnull

    log = tmp_path / "log"
    file_fd = os.open(log, os.O_WRONLY | os.O_CREAT)
    read_fd, write_fd = os.pipe()
    try:
        to_devnull((file_fd, write_fd), keep_files=True)
        os.write(file_fd, b"kept")
        os.write(write_fd, b"lost")
    finally:
        os.close(file_fd)
        os.close(write_fd)
    try:
        assert os.read(read_fd, 10) == b""  # EOF: nothing reached the pipe
    finally:
        os.close(read_fd)
    assert log.read_bytes() == b"kept"


def test_a_second_stop_signal_interrupts_at_once(tmp_path):
    """The trainer's handler: the first SIGTERM asks for a checkpoint and a clean stop,
    the second one (here right after it, at step 10) stops at once with
    KeyboardInterrupt. Its previous handler is back afterwards."""
    import os

    from mtrl.agents.sac import SACConfig
    from mtrl.config import TrainConfig
    from mtrl.envs import EnvConfig, make_envs
    from mtrl.trainer import train

    class TermTwiceAt10:
        def __init__(self, cfg):
            self.env, self.t = make_envs(cfg), 0

        def __getattr__(self, name):
            return getattr(self.env, name)

        def step(self, action):
            out = self.env.step(action)
            self.t += 1
            if self.t == 10:
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)
            return out

    cfg = TrainConfig(env=EnvConfig(benchmark="toy", max_episode_steps=20, seed=3),
                      sac=SACConfig(hidden_sizes=(8,)), total_steps=30, warmup_steps=20,
                      batch_size=32, buffer_capacity=400, eval_every=0, log_every=20,
                      checkpoint_every=60, progress=False, device="cpu",
                      run_dir=str(tmp_path / "run"))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, env_factory=TermTwiceAt10)
    assert signal.getsignal(signal.SIGTERM) is before
