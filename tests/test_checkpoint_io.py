import pytest
import torch

from chameleon_lite.training.checkpoint_io import AtomicCheckpointIO


def test_save_load_round_trip(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"w": torch.arange(3), "step": 7}, tmp_path / "a" / "x.ckpt")
    loaded = io.load_checkpoint(tmp_path / "a" / "x.ckpt")
    assert loaded["step"] == 7 and torch.equal(loaded["w"], torch.arange(3))
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["x.ckpt"]


def test_crash_mid_save_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, target)

    def broken_save(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert io.load_checkpoint(target)["step"] == 1  # the previous checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
