"""`ckpt_path=last`: the newest checkpoint that loads, every one passed over named with the reason.

Damaged and foreign files are told apart by how they fail. A file `torch.load` cannot read (truncated, cut short by
a crash or a full disk) is damage: it is skipped with its reason and the next older checkpoint is tried. A file
that reads completely but was written for another model or dataset (its `hyper_parameters.inference`, the net
config, labels, spacing, modality, patch and CT window, differs from this run's), or is not a medseg checkpoint at
all, is refused: resuming from the older one beside it would silently drop the other run, so the user decides
(`ckpt_path=<file>`).
"""

import logging
from pathlib import Path
from typing import Any

from medseg.checkpoint import CheckpointError, UnreadableCheckpointError, differences, load_checkpoint

log = logging.getLogger(__name__)

# Where Lightning and medseg put checkpoints inside a run directory: ModelCheckpoint's (best, last.ckpt,
# recovery.ckpt), OnExceptionCheckpoint's interrupted.ckpt, and SLURM requeue's hpc_ckpt_<n>.ckpt at the top.
PATTERNS = ("**/checkpoints/*.ckpt", "**/hpc_ckpt_*.ckpt")


def candidates(folder: Path) -> list[Path]:
    """Checkpoints under `folder`, newest (by modification time) first."""
    found = {p for pattern in PATTERNS for p in folder.glob(pattern) if p.is_file()}
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def check_compatible(path: Path, ckpt: dict, expected: dict[str, Any]) -> None:
    """Raise CheckpointError naming `path` and the first settings where `ckpt` was made for another run."""
    diff = [
        f"{k}: {a!r} in the checkpoint, {b!r} now"
        for k, a, b in differences(ckpt["hyper_parameters"]["inference"], expected)
    ]
    if diff:
        raise CheckpointError(
            f"{path}: written for another model or dataset ({'; '.join(diff[:3])}). ckpt_path=last does not skip it "
            "for an older checkpoint; pass the one to resume as ckpt_path=<file>"
        )


def newest_loadable(folders: list[Path], expected: dict[str, Any]) -> Path:
    """The newest checkpoint of the first folder holding any that loads; damaged ones are skipped (logged).

    Args:
        folders: searched in order (this run's own directory first, then the task's runs).
        expected: this run's `hyper_parameters.inference`, compared with each checkpoint's.

    Raises:
        CheckpointError: a foreign checkpoint came before any good one, or none loads (each one named).
    """
    skipped: list[str] = []
    seen: set[Path] = set()
    for folder in folders:
        for path in candidates(folder):
            if path in seen:
                continue
            seen.add(path)
            try:
                ckpt = load_checkpoint(path)
            except UnreadableCheckpointError as err:
                log.warning("ckpt_path=last: skipping %s", err)
                skipped.append(str(err))
                continue
            check_compatible(path, ckpt, expected)
            if skipped:
                log.warning("ckpt_path=last: resuming from %s (%d newer skipped)", path, len(skipped))
            return path
    where = " or ".join(str(f) for f in folders)
    if skipped:
        raise CheckpointError(f"ckpt_path=last: no checkpoint under {where} loads:\n  " + "\n  ".join(skipped))
    raise CheckpointError(f"ckpt_path=last: no checkpoint under {where}")
