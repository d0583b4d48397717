"""Synthetic generator, MSDDataModule on synthetic and real data, transforms."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import load_decathlon_datalist

from medseg.data.datamodule import MSDDataModule
from medseg.data.synthetic import fixed_levels, make_ct_case, write_synthetic_dataset

from .conftest import shared_dataset


def test_synthetic_is_valid_msd_and_deterministic(tmp_path):
    a = write_synthetic_dataset(tmp_path / "a", num_cases=3, min_size=20, max_size=24, seed=5)
    b = write_synthetic_dataset(tmp_path / "b", num_cases=3, min_size=20, max_size=24, seed=5)
    items = load_decathlon_datalist(a / "dataset.json", data_list_key="training", base_dir=a)
    assert len(items) == 3
    meta = json.loads((a / "dataset.json").read_text())
    assert len(meta["labels"]) >= 3  # background + at least 2 foreground labels
    for item in items:
        image, label = nib.load(item["image"]), nib.load(item["label"])
        assert image.shape == label.shape
        np.testing.assert_array_equal(image.affine, label.affine)
        values = set(np.unique(np.asarray(label.dataobj)).tolist())
        assert values == {0, 1, 2}, values
        other = b / item["image"].split("/a/")[-1]
        np.testing.assert_array_equal(np.asarray(image.dataobj), np.asarray(nib.load(other).dataobj))
    # Not all cases are RAS: orientation handling is exercised.
    codes = {nib.aff2axcodes(nib.load(i["image"]).affine) for i in items}
    assert len(codes) > 1


@pytest.mark.parametrize("levels", ["fixed", "random"])
def test_ct_organs_keep_their_level_in_every_case_only_when_fixed(levels):
    """`levels="fixed"`: organ k's mean HU is its `fixed_levels` entry in each of two cases (a task a net can learn);
    "random" (the benchmarks' default) draws a level per case, so some organ's mean moves by far more than noise."""
    rng = np.random.default_rng(0)
    (a, la), (b, lb) = (make_ct_case(rng, (40, 40, 48), 9, levels) for _ in range(2))
    means = [[image[label == k].mean() for k in range(1, 9)] for image, label in ((a, la), (b, lb))]
    moved = np.abs(np.subtract(*means)).max()
    if levels == "fixed":
        np.testing.assert_allclose(means, [fixed_levels(9)] * 2, atol=5)  # 15 HU noise over >= 8 voxels
    else:
        assert moved > 50, means


def test_ct_levels_other_than_fixed_or_random_are_refused():
    with pytest.raises(ValueError, match="levels must be 'random' or 'fixed', got 'fix'"):
        make_ct_case(np.random.default_rng(0), (8, 8, 8), 3, "fix")


def test_datamodule_synthetic_batches(tiny_dataset, tmp_path):
    dm = MSDDataModule(
        str(tiny_dataset),
        patch_size=(24, 24, 24),
        batch_size=2,
        num_samples=2,
        num_workers=0,
        cache="persistent",
        cache_dir=str(tmp_path / "cache"),
    )
    assert (dm.in_channels, dm.num_classes, dm.label_names) == (1, 3, ["background", "organ", "tumour"])
    dm.setup("fit")
    assert len(dm.train_files) + len(dm.val_files) == 8 and len(dm.val_files) == 2
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 24, 24, 24)  # batch_size * num_samples patches
    assert batch["image"].dtype == torch.float32 and batch["label"].shape == (4, 1, 24, 24, 24)
    assert set(torch.unique(batch["label"]).tolist()) <= {0.0, 1.0, 2.0}
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape[:2] == (1, 1) and all(s >= 24 for s in val["image"].shape[2:])
    # Preprocessing is cached on disk, one file per case, and reused by the second pass.
    cache_files = sorted((tmp_path / "cache").rglob("*.pt"))
    assert len(cache_files) == 3  # 2 train items of batch 1 + 1 val item so far
    mtimes = [f.stat().st_mtime_ns for f in cache_files]
    next(iter(dm.val_dataloader()))
    assert [f.stat().st_mtime_ns for f in cache_files] == mtimes


def test_median_spacing_and_split_are_deterministic(tiny_dataset):
    def make(**kwargs):
        return MSDDataModule(str(tiny_dataset), patch_size=(24, 24, 24), cache="none", num_workers=0, **kwargs)

    dm = make()
    assert all(1.5 < s < 2.5 for s in dm.spacing)  # synthetic spacing is 2 mm +- 20%
    assert dm.split() == make().split()
    folds = [{i["image"] for i in make(num_folds=4, fold=f).split()[1]} for f in range(4)]
    assert set().union(*folds) == {i["image"] for i in dm.datalist()} and sum(map(len, folds)) == 8


def test_patch_larger_than_every_image_is_refused(tiny_dataset):
    with pytest.raises(ValueError, match=r"data.patch_size: \[96, 96, 96\] is larger than every image"):
        MSDDataModule(str(tiny_dataset), patch_size=(96, 96, 96), cache="none")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"cache": "ram"}, "data.cache"),
        ({"val_fraction": 1.5}, "data.val_fraction"),
        ({"num_folds": 3, "fold": 3}, "data.fold"),
    ],
)
def test_bad_settings_name_the_key(tiny_dataset, kwargs, message):
    with pytest.raises(ValueError, match=message):
        MSDDataModule(str(tiny_dataset), **kwargs)


def test_datamodule_real_hippocampus(tmp_path):
    root = shared_dataset("Task04_Hippocampus")
    dm = MSDDataModule(
        str(root),
        patch_size=(40, 56, 40),
        batch_size=4,
        num_samples=1,
        num_workers=0,
        cache="persistent",
        cache_dir=str(tmp_path / "cache"),
    )
    assert dm.label_names == ["background", "Anterior", "Posterior"] and dm.in_channels == 1
    assert dm.spacing == (1.0, 1.0, 1.0)
    dm.setup("fit")
    assert (len(dm.train_files), len(dm.val_files)) == (166, 42)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 40, 56, 40) and batch["image"].dtype == torch.float32
    # z-score over nonzero voxels: raw intensities range up to 1.7e6, normalised ones do not.
    assert batch["image"].abs().max() < 50


def test_datamodule_real_brats_channels_last(tmp_path):
    root = shared_dataset("BraTS2018_WT_2mm")
    dm = MSDDataModule(str(root), patch_size=(32, 32, 32), batch_size=1, num_samples=1, num_workers=0, cache="none")
    assert dm.in_channels == 2 and dm.label_names == ["background", "whole tumour"]
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (1, 2, 32, 32, 32)
