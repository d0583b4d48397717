"""Files that are complete or absent, whenever the process dies (kill -9, OOM killer, power cut): checkpoints,
predicted masks and probabilities, sweep tables."""

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

PARTIAL = ".partial-"  # prefix of the temporary files `write_atomic` names by default


def write_atomic(path: str | Path, write: Callable[[Path], None], tmp: Path | None = None) -> Path:
    """``write(tmp)`` into a temporary file beside ``path``, flush it to the disk (fsync), rename it over ``path``
    (atomic on POSIX within one folder) and sync the folder, so the rename itself reaches the disk: a crash at any
    moment leaves the old file or the new one complete, never half of one.

    The default temporary name is hidden, unique per host and process (cluster jobs writing one sweep table at
    once) and ends with ``path``'s own name, so writers that go by the suffix (``nib.save``) see it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp or path.with_name(f"{PARTIAL}{socket.gethostname()}-{os.getpid()}-{path.name}")
    try:
        write(tmp)
        _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync(path.parent, os.O_RDONLY)
    return path


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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

        def dump(tmp: Path) -> None:
            with tmp.open("wb") as f:
                self.write(checkpoint, f)

        # A fixed temporary name (one writer per file), not matching `*.ckpt`: a leftover from a killed write is
        # never taken for a checkpoint and is overwritten by the next write.
        write_atomic(path, dump, tmp=path.with_name(path.name + ".tmp"))

    def write(self, checkpoint: dict[str, Any], f: IO[bytes]) -> None:
        """The bytes of one checkpoint into the open temporary file."""
        torch.save(checkpoint, f)
