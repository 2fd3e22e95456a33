"""Atomic checkpoint writes: a crash mid-save never leaves a half-written ``.ckpt``.

Lightning's default writes through an fsspec transaction whose temp file lives in the system temp directory and is
moved into place; across filesystems that move is a copy, which is not atomic. ``AtomicCheckpointIO`` serialises the
checkpoint to a temp file in the target's own directory, flushes it to disk, then ``os.replace``\\ s it into place.
Use it in a recipe with ``trainer.plugins: [chameleon_lite.training.checkpoint_io.AtomicCheckpointIO]``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose ``save_checkpoint`` is all-or-nothing on local filesystems."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
