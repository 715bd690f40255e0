"""save_checkpoint: a failed write leaves the previous checkpoint and no temp file."""

import errno

import pytest
import torch

import mtrl.checkpoint as ckpt_mod
from mtrl.checkpoint import load_checkpoint, save_checkpoint


@pytest.mark.parametrize("exc", [
    RuntimeError("[enforce fail at inline_container.cc] unexpected pos 64 vs 0"),  # disk full
    OSError(errno.ENOSPC, "No space left on device"),
    ValueError("cannot pickle this object"),
    KeyboardInterrupt(),  # Ctrl-C in the middle of the write
], ids=["runtime", "oserror", "valueerror", "keyboardinterrupt"])
def test_a_failed_checkpoint_write_leaves_the_previous_one_and_no_temp_file(tmp_path,
                                                                           monkeypatch, exc):
    """torch.save fails after writing part of the temp file: the call raises, the folder
    holds exactly the previous checkpoint with its old bytes (no `.checkpoint.pt.*.tmp`
    left behind to fill the disk), and that checkpoint still loads."""
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"format": 1, "step": 10, "agent": {"w": torch.ones(3)}})
    before = path.read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 partial")  # a write cut short
        raise exc

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    with pytest.raises(BaseException) as err:
        save_checkpoint(path, {"format": 1, "step": 20, "agent": {"w": torch.zeros(3)}})
    # write failures (OSError, torch's RuntimeError) become one OSError naming the file;
    # anything else, Ctrl-C included, propagates as itself
    want = OSError if isinstance(exc, (OSError, RuntimeError)) else type(exc)
    assert type(err.value) is want, repr(err.value)
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 10


@pytest.mark.parametrize("step", ["x", -1, 2.5, True, None])
def test_a_checkpoint_without_a_step_count_is_refused_by_name(tmp_path, step):
    """`step: 'x'` gave `error: invalid literal for int() with base 10: 'x'` from both
    `mtrl eval` and `--resume`, naming no file."""
    from mtrl.checkpoint import CHECKPOINT_FORMAT, CheckpointError

    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "step": step, "agent": {}})
    with pytest.raises(CheckpointError, match=rf"checkpoint '{path}' has step .*, not a step "
                       "count; it is damaged or not an mtrl training checkpoint"):
        load_checkpoint(path)
    save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "step": 7, "agent": {}})
    assert load_checkpoint(path)["step"] == 7
