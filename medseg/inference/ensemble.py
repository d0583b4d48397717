"""Which checkpoints an ensemble holds, and whether they can be averaged: same preprocessing, same labels."""

from collections.abc import Sequence
from pathlib import Path

from medseg.checkpoint import CheckpointError

# hyper_parameters.inference entries that must agree: the models see the same preprocessed image and their
# softmax channels mean the same classes. The net itself may differ.
SHARED = ("spacing", "modality", "patch_size", "ct_window", "label_names")
# Files a run's checkpoints/ folder holds beside the best checkpoint(s).
NOT_BEST = ("last.ckpt", "interrupted.ckpt")


def best_checkpoint(run_dir: Path) -> Path:
    """The run's best checkpoint (ModelCheckpoint's monitored file), else its last.ckpt."""
    folder = run_dir / "checkpoints"
    best = sorted(p for p in folder.glob("*.ckpt") if p.name not in NOT_BEST)
    if len(best) > 1:
        names = ", ".join(p.name for p in best)
        raise CheckpointError(f"{folder}: {len(best)} candidate best checkpoints ({names}); list one in ckpt_path")
    if best:
        return best[0]
    if (folder / "last.ckpt").is_file():
        return folder / "last.ckpt"
    raise CheckpointError(f"{folder}: no checkpoint")


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

    def key(info: dict, name: str):
        return info["net"].get("in_channels") if name == "in_channels" else info.get(name)

    for info, path in zip(infos[1:], paths[1:], strict=True):
        for name in (*SHARED, "in_channels"):
            if key(info, name) != key(infos[0], name):
                raise CheckpointError(
                    f"ckpt_path: {paths[0]} and {path} differ in {name} ({key(infos[0], name)} vs {key(info, name)});"
                    " an ensemble needs the same preprocessing and labels"
                )
