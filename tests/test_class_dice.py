"""Validation Dice from voxel counts equals MONAI's one-hot DiceMetric (issue 22, part 2)."""

import torch
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot

from medseg.models.class_dice import ClassDice


def test_equals_monai_dice_metric_with_absent_and_false_positive_classes():
    torch.manual_seed(0)
    classes, ours, monai = 12, ClassDice(12), DiceMetric(include_background=False, reduction="mean_batch")
    for case in range(3):
        target = torch.randint(0, classes - 2, (1, 1, 20, 18, 16))  # classes 10 and 11 never in a target
        pred = torch.where(torch.rand(target.shape) < 0.7, target, torch.randint(0, classes, target.shape))
        if case == 1:
            pred[pred == 3] = 0  # class 3 missed entirely in one case
        ours(pred, target)
        monai(one_hot(pred, classes), one_hot(target, classes))
    expected, got = monai.aggregate(), ours.aggregate()
    assert got.shape == (classes - 1,) and (got[-2:] == 0).all()  # in no target: 0, as MONAI reduces it
    torch.testing.assert_close(got, expected.float())
    assert 0.0 < got[2] < expected[0] + 1  # class 3: lower after the miss, still counted
    ours.reset()
    assert ours.cases == []


def test_many_class_run_logs_one_table_and_keeps_the_mean(tmp_path):
    """A real 1-epoch run with 24 classes (above PER_CLASS_KEYS): `val/dice` is a CSV column, the 23 per-class
    values are rows of per_class.csv, not 23 columns; the printed summary still lists every class."""
    import csv

    from medseg.data.synthetic import write_ct_dataset
    from medseg.models.class_table import CSV_NAME, PER_CLASS_KEYS
    from medseg.train import train

    from .conftest import compose_cfg
    from .helpers import TINY, TINY_UNET

    root = write_ct_dataset(tmp_path / "Task_ct", num_cases=3, num_classes=24, shape=(40, 40, 32))
    overrides = [
        *TINY,
        *TINY_UNET,
        "trainer.max_epochs=1",
        "test=false",
        "data.val_fraction=0.34",
        "data.spacing=[1.5,1.5,1.5]",
    ]
    overrides += [f"data.root={root}", "++data.synthesize=null", f"data.cache_dir={tmp_path / 'cache'}"]
    cfg = compose_cfg([*overrides, f"paths.log_dir={tmp_path / 'logs'}"], tmp_path / "run")
    train(cfg)
    (metrics,) = (tmp_path / "run").rglob("metrics.csv")
    header = metrics.read_text().splitlines()[0].split(",")
    assert "val/dice" in header and not [h for h in header if h.startswith("val/dice/")], header
    (table,) = (tmp_path / "run").rglob(CSV_NAME)
    rows = list(csv.DictReader(table.open()))
    assert 23 > PER_CLASS_KEYS and [r["class"] for r in rows] == [f"organ_{k:03d}" for k in range(1, 24)]
    assert {r["metric"] for r in rows} == {"val/dice"} and all(0.0 <= float(r["value"]) <= 1.0 for r in rows)
