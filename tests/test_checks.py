"""Dataset checks on a bad-input corpus written here: a valid small dataset, then one corruption per case."""

import gzip
import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.data.integrity import CheckReport, DatasetError, check_dataset

from .helpers import run_cli

# LPS-like, anisotropic and off the origin, so an affine check that compares against identity would fail.
AFFINE = np.array([[-1.5, 0, 0, 12.0], [0, -1.5, 0, -30.0], [0, 0, 2.0, 5.0], [0, 0, 0, 1]])
SHAPE = (8, 8, 8)
LABELS = {"0": "background", "1": "organ", "2": "tumour"}
MODALITIES = ["FLAIR", "T1", "T2"]

DATASETS = Path(os.environ.get("MEDSEG_DATASETS", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))


def image(i: int) -> str:
    return f"./imagesTr/case_{i}.nii.gz"


def label(i: int) -> str:
    return f"./labelsTr/case_{i}.nii.gz"


def save(root: Path, rel: str, data: np.ndarray, affine: np.ndarray = AFFINE) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), root / rel)


def random_image(channels: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    # Random, so that gzip cannot squeeze the data into a few bytes and truncation really cuts the data.
    data = np.random.default_rng(0).normal(100, 20, shape + ((channels,) if channels > 1 else ()))
    return data.astype(np.float32)


def valid_label() -> np.ndarray:
    data = np.zeros(SHAPE, np.uint8)
    data[2:6, 2:6, 2:6] = 1
    data[3:5, 3:5, 3:5] = 2
    return data


def make_dataset(root: Path, channels: int = 1, num_cases: int = 3) -> Path:
    for i in range(num_cases):
        save(root, image(i), random_image(channels))
        save(root, label(i), valid_label())
    meta = {
        "name": "Tiny",
        "tensorImageSize": "3D" if channels == 1 else "4D",
        "modality": {str(c): MODALITIES[c] for c in range(channels)},
        "labels": LABELS,
        "numTraining": num_cases,
        "training": [{"image": image(i), "label": label(i)} for i in range(num_cases)],
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root


def edit_meta(root: Path, edit: Callable[[dict], object]) -> None:
    meta = json.loads((root / "dataset.json").read_text())
    edit(meta)
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))


def has_error(report: CheckReport, file: str, word: str) -> bool:
    return any(p.file == file and word in p.reason for p in report.errors)


# Each corruption breaks a valid dataset in one way and returns the file the error must name and a word
# specific to the problem.
def no_meta(root: Path, channels: int) -> tuple[str, str]:
    (root / "dataset.json").unlink()
    return "dataset.json", "missing"


def malformed_json(root: Path, channels: int) -> tuple[str, str]:
    (root / "dataset.json").write_text('{\n  "name": "Tiny",\n  "labels": {"0": "background",}\n}\n')
    return "dataset.json", "line 3, column"


def missing_key(key: str) -> Callable[[Path, int], tuple[str, str]]:
    def corrupt(root: Path, channels: int) -> tuple[str, str]:
        edit_meta(root, lambda meta: meta.pop(key))
        return "dataset.json", f"missing required key(s): {key}"

    corrupt.__name__ = f"missing_{key}"
    return corrupt


def empty_training(root: Path, channels: int) -> tuple[str, str]:
    edit_meta(root, lambda meta: meta.update(training=[]))
    return "dataset.json", "empty"


def entry_without_label(root: Path, channels: int) -> tuple[str, str]:
    edit_meta(root, lambda meta: meta["training"][1].pop("label"))
    return "dataset.json", "entry 1"


def non_integer_label_key(root: Path, channels: int) -> tuple[str, str]:
    edit_meta(root, lambda meta: meta.update(labels={"0": "background", "1": "organ", "two": "tumour"}))
    return "dataset.json", "'two' is not an integer"


def duplicate_entry(root: Path, channels: int) -> tuple[str, str]:
    # Spelled without "./": still the same file.
    edit_meta(root, lambda meta: meta["training"].append({"image": "imagesTr/case_0.nii.gz", "label": label(0)}))
    return label(0), "duplicate"


def missing_file(root: Path, channels: int) -> tuple[str, str]:
    (root / label(1)).unlink()
    return label(1), "does not exist"


def truncated(root: Path, channels: int) -> tuple[str, str]:
    data = (root / image(1)).read_bytes()
    (root / image(1)).write_bytes(data[: len(data) // 2])
    return image(1), "truncated"


def text_named_nifti(root: Path, channels: int) -> tuple[str, str]:
    (root / image(1)).write_text("this is not an image\n")
    return image(1), "not a readable NIfTI"


def gzipped_text_named_nifti(root: Path, channels: int) -> tuple[str, str]:
    (root / label(1)).write_bytes(gzip.compress(b"still not an image\n" * 50))
    return label(1), "not a readable NIfTI"


def shape_mismatch(root: Path, channels: int) -> tuple[str, str]:
    save(root, label(1), np.zeros((8, 8, 9), np.uint8))
    return label(1), "does not match image"


def label_4d(root: Path, channels: int) -> tuple[str, str]:
    save(root, label(1), valid_label()[..., None])
    return label(1), "must be 3D"


def image_2d(root: Path, channels: int) -> tuple[str, str]:
    save(root, image(1), random_image(1, shape=(8, 8)))
    return image(1), "3D or 4D"


def shifted_affine(root: Path, channels: int) -> tuple[str, str]:
    affine = AFFINE.copy()
    affine[0, 3] += 5.0
    save(root, label(1), valid_label(), affine)
    return label(1), "affine"


def undeclared_label(root: Path, channels: int) -> tuple[str, str]:
    data = valid_label()
    data[0, 0, 0] = 7
    save(root, label(1), data)
    return label(1), "not declared in dataset.json labels: 7"


def nan_voxel(root: Path, channels: int) -> tuple[str, str]:
    data = random_image(channels)
    data.flat[100] = np.nan
    save(root, image(1), data)
    return image(1), "1 NaN"


def inf_voxel(root: Path, channels: int) -> tuple[str, str]:
    data = random_image(channels)
    data.flat[100] = -np.inf
    save(root, image(1), data)
    return image(1), "1 Inf"


def extra_channel(root: Path, channels: int) -> tuple[str, str]:
    save(root, image(1), random_image(channels + 1))
    return image(1), f"has {channels + 1} channel(s) but dataset.json modality lists {channels}"


def zero_spacing(root: Path, channels: int) -> tuple[str, str]:
    img = nib.Nifti1Image(random_image(channels), AFFINE)
    zooms = img.header.get_zooms()
    img.header.set_zooms((0.0,) + zooms[1:])
    nib.save(img, root / image(1))
    return image(1), "spacing"


def negative_spacing(root: Path, channels: int) -> tuple[str, str]:
    img = nib.Nifti1Image(valid_label(), AFFINE)
    img.header["pixdim"][2] = -1.5  # set_zooms refuses negative values; a broken writer does not
    nib.save(img, root / label(1))
    return label(1), "spacing"


CORRUPTIONS = [
    no_meta,
    malformed_json,
    missing_key("labels"),
    missing_key("modality"),
    missing_key("training"),
    empty_training,
    entry_without_label,
    non_integer_label_key,
    duplicate_entry,
    missing_file,
    truncated,
    text_named_nifti,
    gzipped_text_named_nifti,
    shape_mismatch,
    label_4d,
    image_2d,
    shifted_affine,
    undeclared_label,
    nan_voxel,
    inf_voxel,
    extra_channel,
    zero_spacing,
    negative_spacing,
]


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda c: c.__name__)
def test_corruption_is_reported(tmp_path: Path, corrupt: Callable[[Path, int], tuple[str, str]], channels: int):
    make_dataset(tmp_path, channels)
    file, word = corrupt(tmp_path, channels)
    report = check_dataset(tmp_path)
    assert has_error(report, file, word), report.errors
    with pytest.raises(DatasetError, match=re.escape(word)):
        report.raise_if_errors()


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("check_voxels", [True, False])
def test_valid_dataset_has_no_problems(tmp_path: Path, channels: int, check_voxels: bool):
    report = check_dataset(make_dataset(tmp_path, channels), check_voxels=check_voxels)
    assert report.errors == [] and report.warnings == []
    assert report.num_cases == 3
    report.raise_if_errors()


def test_every_bad_case_is_reported_in_one_run(tmp_path: Path):
    make_dataset(tmp_path)
    undeclared_label(tmp_path, 1)
    data = (tmp_path / image(2)).read_bytes()
    (tmp_path / image(2)).write_bytes(data[: len(data) // 2])

    report = check_dataset(tmp_path)
    assert has_error(report, label(1), "not declared")
    assert has_error(report, image(2), "truncated")
    assert len(report.errors) == 2
    with pytest.raises(DatasetError) as excinfo:
        report.raise_if_errors()
    lines = str(excinfo.value).splitlines()
    assert lines[0] == f"2 problem(s) found in dataset {tmp_path}:"
    assert lines[1].startswith(f"{label(1)}: ") and lines[2].startswith(f"{image(2)}: ")


def test_empty_label_is_a_warning(tmp_path: Path):
    make_dataset(tmp_path)
    save(tmp_path, label(1), np.zeros(SHAPE, np.uint8))
    report = check_dataset(tmp_path)
    assert report.errors == []
    assert [(p.file, "no foreground" in p.reason) for p in report.warnings] == [(label(1), True)]


def test_without_voxels_only_headers_are_checked(tmp_path: Path):
    make_dataset(tmp_path)
    nan_voxel(tmp_path, 1)
    shifted_affine(tmp_path, 1)
    report = check_dataset(tmp_path, check_voxels=False)
    assert [p.file for p in report.errors] == [label(1)]
    assert "affine" in report.errors[0].reason


def run_check(*args: str | Path) -> subprocess.CompletedProcess:
    return run_cli(*args, module="medseg.data.check")


def test_cli(tmp_path: Path):
    good = make_dataset(tmp_path / "good")
    result = run_check(good)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1] == "good: 3 cases, 0 errors, 0 warnings"

    bad = make_dataset(tmp_path / "bad")
    undeclared_label(bad, 1)
    result = run_check(bad, "--no-voxels")
    assert result.returncode == 0  # the undeclared value is in the voxels, which --no-voxels skips
    result = run_check(bad)
    assert result.returncode == 1
    assert "case_1.nii.gz" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "bad: 3 cases, 1 errors, 0 warnings"


@pytest.mark.parametrize("name", ["Task04_Hippocampus", "BraTS2018_WT_2mm"])
def test_real_dataset_is_clean(name: str):
    path = DATASETS / name
    if not (path / "dataset.json").is_file():
        pytest.skip(f"{name} not found at {path}")
    report = check_dataset(path)
    assert report.errors == [], "\n".join(map(str, report.errors))
    assert report.num_cases == len(json.loads((path / "dataset.json").read_text())["training"])
