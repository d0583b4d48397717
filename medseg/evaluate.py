"""Scoring: `python -m medseg.evaluate pred=<folder> labels=<folder>`: per-case Dice and HD95 per class (CSV)
and a summary, with MONAI's metrics."""

import csv
import json
import math
from collections.abc import Callable
from pathlib import Path

import hydra
import nibabel as nib
import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from monai.networks.utils import one_hot
from omegaconf import DictConfig, OmegaConf

from medseg import CONF_DIR
from medseg.tracking.case_table import EvaluationTable


def class_names(labels_dir: Path, num_classes: int, names: list[str] | None = None) -> list[str]:
    """Names of classes 0..N-1: given, else from the dataset.json beside the labels folder, else class_<i>."""
    if names:
        return list(names)
    meta = labels_dir.parent / "dataset.json"
    if meta.is_file():
        labels = json.loads(meta.read_text()).get("labels", {})
        return [labels.get(str(i), f"class_{i}") for i in range(num_classes)]
    return [f"class_{i}" for i in range(num_classes)]


def score_case(pred: np.ndarray, label: np.ndarray, num_classes: int, spacing) -> tuple[list[float], list[float]]:
    """Dice and HD95 (mm) for classes 1..N-1. A class absent from both masks has Dice NaN (nothing to score)."""
    p = one_hot(torch.as_tensor(pred, dtype=torch.long)[None, None], num_classes)
    t = one_hot(torch.as_tensor(label, dtype=torch.long)[None, None], num_classes)
    dice = compute_dice(p, t, include_background=False, ignore_empty=True)[0]
    hd95 = compute_hausdorff_distance(p, t, include_background=False, percentile=95, spacing=spacing)[0]
    return dice.tolist(), hd95.tolist()


def evaluate(
    pred_dir: str | Path,
    labels_dir: str | Path,
    output: str | Path,
    names: list[str] | None = None,
    on_case: Callable[..., None] | None = None,
) -> dict:
    """Score every mask in `pred_dir` against the same-named label; write the per-case CSV and return the
    per-class means {"dice/<name>": ..., "hd95/<name>": ..., "dice": mean over classes}. `on_case(name, pred,
    label, dice, hd95, names)` is called for each case (the W&B per-case table)."""
    pred_dir, labels_dir = Path(pred_dir), Path(labels_dir)
    preds = sorted(p for p in pred_dir.iterdir() if p.name.endswith((".nii", ".nii.gz")))
    if not preds:
        raise FileNotFoundError(f"pred={pred_dir}: no .nii/.nii.gz masks")
    missing = [p.name for p in preds if not (labels_dir / p.name).is_file()]
    if missing:
        raise FileNotFoundError(f"labels={labels_dir}: no label for {', '.join(missing)}")

    cases = []
    for path in preds:
        pred_img, label_img = nib.load(path), nib.load(labels_dir / path.name)
        pred, label = np.asarray(pred_img.dataobj).astype(np.int64), np.asarray(label_img.dataobj).astype(np.int64)
        if pred.shape != label.shape:
            raise ValueError(f"{path}: shape {pred.shape} differs from its label's {label.shape}")
        cases.append((path.name, pred, label, label_img.header.get_zooms()[:3]))
    num_classes = int(max(max(p.max(), lb.max()) for _, p, lb, _ in cases)) + 1
    num_classes = max(num_classes, len(names or []))
    names = class_names(labels_dir, num_classes, names)

    rows = []
    for name, pred, label, spacing in cases:
        dice, hd95 = score_case(pred, label, num_classes, [float(s) for s in spacing])
        if on_case is not None:
            on_case(name, pred, label, dice, hd95, names)
        row = {"case": name}
        row.update({f"dice/{n}": d for n, d in zip(names[1:], dice, strict=True)})
        row.update({f"hd95/{n}": h for n, h in zip(names[1:], hd95, strict=True)})
        rows.append(row)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    summary = {key: float(np.nanmean([r[key] for r in rows])) for key in rows[0] if key != "case"}
    summary["dice"] = float(np.nanmean([summary[f"dice/{n}"] for n in names[1:]]))
    return summary


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    table = EvaluationTable(Path(cfg.labels).parent / "imagesTr") if cfg.wandb.mode else None
    summary = evaluate(cfg.pred, cfg.labels, cfg.output, cfg.label_names, on_case=table)
    for key, value in summary.items():
        print(f"{key:30s} {value:.4f}" if not math.isnan(value) else f"{key:30s} nan")
    print(f"per-case table: {cfg.output}")
    if table is not None:
        print(f"W&B run: {table.log(summary, OmegaConf.to_container(cfg, resolve=True), **cfg.wandb)}")


if __name__ == "__main__":
    main()
