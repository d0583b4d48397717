"""Which checkpoints an ensemble holds, and whether they can be averaged: same preprocessing, same labels."""

from collections.abc import Sequence
from pathlib import Path

from medseg.checkpoint import CheckpointError, best_checkpoint, differences

# hyper_parameters.inference entries that must agree: the models see the same preprocessed image and their
# softmax channels mean the same classes. The net itself may differ.
SHARED = ("spacing", "modality", "patch_size", "ct_window", "label_names", "net.in_channels")


def checkpoint_paths(ckpt_path: str | Sequence[str]) -> list[Path]:
    """The checkpoint files behind `ckpt_path`: one file, a run folder (its best checkpoint), a folder of fold
    runs (e.g. a multirun folder: the best checkpoint of every subfolder holding checkpoints/), or a list of these."""
    if not isinstance(ckpt_path, str):
        if not ckpt_path:
            raise CheckpointError("ckpt_path: an empty list")
        return [p for item in ckpt_path for p in checkpoint_paths(str(item))]
    path = Path(ckpt_path)
    if not path.is_dir():
        return [path]  # a file; load_checkpoint names it if it is missing
    if (path / "checkpoints").is_dir():
        return [best_checkpoint(path)]
    runs = sorted(p.parent for p in path.glob("*/checkpoints"))
    if not runs:
        raise CheckpointError(f"ckpt_path={path}: a folder without checkpoints/ or run folders holding one")
    return [best_checkpoint(run) for run in runs]


def check_compatible(infos: Sequence[dict], paths: Sequence[Path]) -> None:
    """Raise a one-line CheckpointError naming the first two checkpoints whose preprocessing, labels or input
    channels differ. `infos`: each checkpoint's `hyper_parameters.inference`."""
    for info, path in zip(infos[1:], paths[1:], strict=True):
        if diff := differences(infos[0], info, SHARED):
            name, first, other = diff[0]
            raise CheckpointError(
                f"ckpt_path: {paths[0]} and {path} differ in {name} ({first} vs {other});"
                " an ensemble needs the same preprocessing and labels"
            )
