"""Postprocessing chosen on validation, as nnU-Net does: keep the largest connected component of a class only
where that raised the class's validation Dice.

The test pass after training (SegmentationModule) measures each class's Dice with and without it on the validation
split and writes the decision beside the checkpoint it tested (`<ckpt>.postprocessing.json`). An ensemble of folds
combines its folds' measurements, each on its own held-out cases, weighted by their case counts (nnU-Net decides
on the cross-validation predictions the same way); a folder of fold runs stores that decision in the folder.
"""

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.transforms import KeepLargestConnectedComponent

log = logging.getLogger(__name__)


def decision_path(ckpt: Path) -> Path:
    """Where the decision for a checkpoint (or a folder of fold runs) is stored."""
    return ckpt / "postprocessing.json" if ckpt.is_dir() else ckpt.with_suffix(".postprocessing.json")


def decide(label_names: Sequence[str], dice: Sequence[float], dice_lcc: Sequence[float], cases: int) -> dict:
    """The decision record: per foreground class its mean validation Dice without and with keep-largest, and the
    classes (indices into `label_names`) where keep-largest is kept because it raised the Dice."""
    classes = {
        name: {"dice": float(d), "dice_lcc": float(d_lcc)}
        for name, d, d_lcc in zip(label_names[1:], dice, dice_lcc, strict=True)
    }
    keep = [i for i, name in enumerate(label_names) if i and classes[name]["dice_lcc"] > classes[name]["dice"]]
    return {"label_names": list(label_names), "cases": int(cases), "classes": classes, "keep_largest": keep}


def combine(records: Sequence[dict]) -> dict:
    """One decision from several folds' records: Dice means weighted by each fold's validation case count."""
    names = records[0]["label_names"]
    weights = np.array([r["cases"] for r in records], dtype=float)

    def mean(key: str) -> list[float]:
        per_fold = np.array([[r["classes"][n][key] for n in names[1:]] for r in records])
        # a class absent from one fold's cases has NaN Dice there; average over the folds that have it
        valid = ~np.isnan(per_fold)
        return list((np.where(valid, per_fold, 0) * weights[:, None]).sum(0) / (valid * weights[:, None]).sum(0))

    return decide(names, mean("dice"), mean("dice_lcc"), int(weights.sum()))


def save(record: dict, path: Path) -> Path:
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def load(path: Path) -> dict:
    try:
        record = json.loads(Path(path).read_text())
        record["keep_largest"] = [int(i) for i in record["keep_largest"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"postprocessing={path}: not a postprocessing decision ({err})") from None
    return record


def for_checkpoints(ckpts: Sequence[Path], folder: Path | None = None) -> dict | None:
    """The stored decision for a model or an ensemble; None (with a warning) where a checkpoint has none.

    With `folder` (ckpt_path was a folder of fold runs), the combined decision is written there the first time
    and read from there afterwards, so it is decided once."""
    if folder is not None and len(ckpts) > 1 and decision_path(folder).is_file():
        return load(decision_path(folder))
    records = []
    for ckpt in ckpts:
        path = decision_path(ckpt)
        if not path.is_file():
            log.warning(
                "no postprocessing decision for %s (its test pass writes %s: python -m medseg.train train=false "
                "ckpt_path=%s with the run's data settings); predicting without postprocessing",
                ckpt, path.name, ckpt,
            )  # fmt: skip
            return None
        records.append(load(path))
    record = records[0] if len(records) == 1 else combine(records)
    if folder is not None and len(ckpts) > 1:
        save(record, decision_path(folder))
    return record


def keep_largest(labels: np.ndarray | torch.Tensor, classes: Sequence[int]) -> np.ndarray | torch.Tensor:
    """Class-index map (1, X, Y, Z) with only the largest connected component of each class in `classes` kept
    (the rest set to background); other classes untouched. MONAI's transform, full connectivity."""
    if not classes:
        return labels
    return KeepLargestConnectedComponent(applied_labels=list(classes), is_onehot=False, independent=True)(labels)
