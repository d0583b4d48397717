"""Per-class metrics of many-class runs as one table, not one chart per class.

Up to PER_CLASS_KEYS foreground classes each value is its own metric key (`val/dice/<label>`: the dashboards and
the run summary read those). Above it, 100+ keys per metric would be 100+ W&B charts and CSV columns, so the
values go into one table per metric instead: a `wandb.Table` under `<stage>/<metric>/per_class` (one per
validation round; W&B shows it as one panel) and rows of `per_class.csv` in the logger's directory, long format
(`metric,epoch,step,class,value`: one grouped, spreadsheet-friendly file). `<stage>/<metric>`, the mean over
classes, stays a key either way.
"""

import csv
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger

# MSD's tasks have at most 16 foreground classes (AMOS 15, BTCV 13): they keep their per-class keys; whole-body
# label sets (TotalSegmentator 117, AbdomenAtlas 25+) get the table.
PER_CLASS_KEYS = 16
CSV_NAME = "per_class.csv"


def log_class_table(module: pl.LightningModule, key: str, labels: Sequence[str], values: torch.Tensor) -> bool:
    """Logs `values` (C - 1,) of metric `key` ("val/dice") as a table when there are more than PER_CLASS_KEYS
    `labels`; returns whether it did (False: the caller logs one key per class). Rank zero writes; not during
    Lightning's sanity check, whose logged values are discarded too."""
    if len(labels) <= PER_CLASS_KEYS:
        return False
    trainer = module.trainer
    if trainer.sanity_checking or not trainer.is_global_zero:
        return True
    rows = [[label, float(v)] for label, v in zip(labels, values.tolist(), strict=True)]
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(key=f"{key}/per_class", columns=["class", key], data=rows, step=trainer.global_step)
    folder = Path(trainer.log_dir or trainer.default_root_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CSV_NAME
    new = not path.is_file()
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["metric", "epoch", "step", "class", "value"])
        writer.writerows([key, trainer.current_epoch, trainer.global_step, label, value] for label, value in rows)
    return True
