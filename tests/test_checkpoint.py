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


def test_a_foreign_file_is_not_an_mtrl_checkpoint(tmp_path):
    """A torch file without mtrl's "format" key (someone else's checkpoint) or one that is
    not a dict: a CheckpointError naming the file, not a KeyError."""
    for name, obj in (("foreign.pt", {"step": 5, "agent": {}}), ("list.pt", [torch.ones(2)])):
        torch.save(obj, tmp_path / name)
        with pytest.raises(ckpt_mod.CheckpointError,
                           match=rf"checkpoint '.*{name}' is not an mtrl checkpoint$"):
            load_checkpoint(tmp_path / name)


def test_a_checkpoint_saved_on_cuda_loads_on_a_cpu_only_machine(tmp_path, monkeypatch):
    """Tensors tagged "cuda:0" (a GPU run) are mapped to the CPU: a run moves between
    machines (its resume reseeds the generators saved on another device type)."""
    import torch.serialization as ser

    path = tmp_path / "checkpoint.pt"
    real_tag = ser.location_tag
    monkeypatch.setattr(ser, "location_tag",
                        lambda storage: "cuda:0" if storage.device.type == "cpu" else
                        real_tag(storage))
    torch.save({"format": 1, "step": 3, "agent": {"w": torch.ones(2)}}, path)
    monkeypatch.setattr(ser, "location_tag", real_tag)
    if not torch.cuda.is_available():  # what a load without a map does on this machine
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    state = load_checkpoint(path)
    assert state["step"] == 3 and state["agent"]["w"].device.type == "cpu"


def test_a_failed_json_write_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    """Disk full at fsync: the call raises, eval_30.json keeps its old text and no
    `.eval_30.json.*.tmp` is left behind (resume cleans only a run's own files)."""
    path = tmp_path / "eval_30.json"
    ckpt_mod.atomic_write_json(path, {"old": 1})

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod.os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        ckpt_mod.atomic_write_json(path, {"new": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["eval_30.json"]
    assert path.read_text() == '{\n  "old": 1\n}\n'
