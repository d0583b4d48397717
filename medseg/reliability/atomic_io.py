"""Checkpoint files that are complete or absent, whenever the process dies (kill -9, OOM killer, power cut)."""

import os
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes `<name>.tmp` beside the checkpoint, flushes it to the disk (fsync), renames it over the old file
    and syncs the folder: a crash at any moment leaves either the old or the new checkpoint complete.

    Lightning's own `TorchCheckpointIO` writes through fsspec, whose local "transaction" writes into the system
    temp folder and moves the file into place, without fsync; when /tmp is another file system (tmpfs, a node's
    local disk) that move is a copy, and a crash during it leaves a truncated file under the final name.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A fixed name (one writer per file): a leftover from a killed write is overwritten by the next one.
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as f:
            self.write(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX within one folder
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # the rename itself reaches the disk
        finally:
            os.close(folder)

    def write(self, checkpoint: dict[str, Any], f: IO[bytes]) -> None:
        """The bytes of one checkpoint into the open temporary file."""
        torch.save(checkpoint, f)
