"""Atomic checkpoint writes; `ckpt_path=last` with a damaged newest checkpoint (skipped, named) and a foreign one
(refused)."""

import io
import logging
import os
from pathlib import Path

import pytest
import torch

from medseg.checkpoint import CheckpointError
from medseg.reliability.atomic_io import AtomicCheckpointIO
from medseg.train import train


def _run(tiny_cfg, name: str, *extra: str) -> Path:
    """Train in `<log_dir>/train/runs/<name>` (where ckpt_path=last looks); returns its checkpoints folder."""
    cfg = tiny_cfg("trainer.max_epochs=2", "test=false", *extra)
    cfg.paths.output_dir = str(Path(cfg.paths.log_dir, "train", "runs", name))
    train(cfg)
    return Path(cfg.paths.output_dir, "checkpoints")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def test_truncated_newest_checkpoint_is_skipped_for_the_next_one(tiny_cfg, caplog):
    ckpts = _run(tiny_cfg, "first")
    last = ckpts / "last.ckpt"
    [best] = ckpts.glob("epoch*.ckpt")  # the best by val/dice, written with last.ckpt
    os.utime(best, (last.stat().st_mtime - 1,) * 2)  # so that it is the newest after last.ckpt
    _truncate(last)

    cfg = tiny_cfg("trainer.max_epochs=3", "test=false", "ckpt_path=last")
    cfg.paths.output_dir = str(Path(cfg.paths.log_dir, "train", "runs", "resumed"))
    with caplog.at_level(logging.WARNING):
        train(cfg)
    assert f"skipping {last}: not a readable checkpoint (truncated" in caplog.text
    assert f"resuming from {best} (1 newer skipped)" in caplog.text
    resumed = torch.load(Path(cfg.paths.output_dir, "checkpoints", "last.ckpt"), weights_only=True)
    first = torch.load(best, weights_only=True)
    per_epoch = first["global_step"] // (first["epoch"] + 1)
    assert resumed["epoch"] == 2 and resumed["global_step"] == 3 * per_epoch

    # Nothing loads: every file is named with its reason.
    every = list(Path(cfg.paths.log_dir).rglob("*.ckpt"))
    for path in every:
        _truncate(path)
    with pytest.raises(CheckpointError, match="no checkpoint under .* loads:\n") as err:
        train(cfg)
    assert all(f"{path}: not a readable checkpoint" in str(err.value) for path in every) and len(every) >= 4


def test_foreign_checkpoint_is_refused_with_its_reason(tiny_cfg):
    _run(tiny_cfg, "ours", "trainer.max_epochs=1")
    # Newer, readable, but another net (and so not ours to resume): refused, not skipped for the older one.
    foreign = _run(tiny_cfg, "other", "trainer.max_epochs=1", "model.net.channels=[4,8,16]")
    with pytest.raises(CheckpointError) as err:
        train(tiny_cfg("ckpt_path=last", "test=false"))
    message = str(err.value)
    assert str(foreign) in message and "another model or dataset" in message
    assert "net.channels: [4, 8, 16] in the checkpoint, [8, 16, 32] now" in message


class _DiesHalfWay(AtomicCheckpointIO):
    """Writes half of the checkpoint, then fails as a killed process would stop."""

    def write(self, checkpoint, f) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise KeyboardInterrupt


def test_atomic_write_leaves_the_old_checkpoint_whole(tmp_path):
    path = tmp_path / "checkpoints" / "recovery.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)
    with pytest.raises(KeyboardInterrupt):
        _DiesHalfWay().save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    assert torch.load(path, weights_only=True)["step"] == 1  # the old file, complete, under its name
    leftover = path.with_name("recovery.ckpt.tmp")
    assert not leftover.exists()  # a write that raised cleans up after itself
    leftover.write_bytes(b"half a checkpoint")  # what a SIGKILL in the middle of a write leaves
    AtomicCheckpointIO().save_checkpoint({"step": 3, "w": torch.zeros(1000)}, path)  # the leftover is reused
    assert torch.load(path, weights_only=True)["step"] == 3 and not path.with_name("recovery.ckpt.tmp").exists()
