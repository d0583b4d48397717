"""Validate an MSD-layout dataset before training: every bad case is named with the reason, all in one pass.

A broken case otherwise surfaces hours into training as a loader crash (truncated file) or never (a label value
that no output channel covers, a label shifted against its image), so it is cheaper to look at every file first.
"""

import functools
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.openers import ImageOpener

from medseg.data.integrity_cache import checked_cases

REQUIRED_KEYS = ("labels", "modality", "training")

# What a bad file can raise while nibabel reads it: gzip errors are OSError (BadGzipFile) or zlib.error, a cut
# stream is EOFError, a header nibabel cannot make sense of is ImageFileError or a ValueError.
_READ_ERRORS = (ImageFileError, OSError, EOFError, ValueError, zlib.error)


class DatasetError(ValueError):
    """A dataset failed its checks; the message lists every error, one per line."""


@dataclass(frozen=True)
class Problem:
    file: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.reason}"


@dataclass
class CheckReport:
    root: Path
    num_cases: int = 0
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    def raise_if_errors(self) -> None:
        if self.errors:
            lines = [f"{len(self.errors)} problem(s) found in dataset {self.root}:"]
            raise DatasetError("\n".join(lines + [str(p) for p in self.errors]))


def check_dataset(
    root: str | Path,
    *,
    affine_atol: float = 1e-3,
    check_voxels: bool = True,
    cache_dir: str | Path | None = None,
    workers: int = 0,
) -> CheckReport:
    """Check `dataset.json` and every training image/label pair it lists.

    Args:
        root: the dataset folder, holding `dataset.json`.
        affine_atol: largest allowed difference between any image and label affine entry (mm for translations).
        check_voxels: also read the voxel data (NaN/Inf, label values, truncated files). Without it only the
            headers are read: much faster, but a file cut short after its header goes unnoticed.
        cache_dir: where each case's result is kept under its files' size and modification time; a case whose
            files are unchanged is not read again (`medseg.data.integrity_cache`). None: every case is read.
        workers: processes that read the cases (0: this one); a progress bar shows from 50 cases on.
    """
    report = CheckReport(root=Path(root))
    meta = _read_meta(report)
    if meta is None:
        return report

    declared = _declared_labels(meta, report)
    channels = len(meta["modality"]) if isinstance(meta.get("modality"), dict) else None
    if "modality" in meta and not channels:
        report.errors.append(Problem("dataset.json", "modality must be a non-empty object"))

    training = meta.get("training")
    if training is None:
        return report
    if not isinstance(training, list):
        report.errors.append(Problem("dataset.json", "training must be a list"))
        return report
    if not training:
        report.errors.append(Problem("dataset.json", "training list is empty"))
    report.num_cases = len(training)

    first_seen: dict[str, int] = {}
    cases = []
    for i, entry in enumerate(training):
        image, label = (entry.get("image"), entry.get("label")) if isinstance(entry, dict) else (None, None)
        if not (isinstance(image, str) and isinstance(label, str)):
            report.errors.append(Problem("dataset.json", f"training entry {i} needs 'image' and 'label' paths"))
            continue
        for rel in (image, label):
            # "./a.nii.gz" and "a.nii.gz" are the same file: a case listed twice is seen twice per epoch.
            key = os.path.normpath(rel)
            if key in first_seen:
                report.errors.append(Problem(rel, f"duplicate: training entries {first_seen[key]} and {i} list it"))
            first_seen.setdefault(key, i)
        cases.append((image, label))
    settings = dict(channels=channels, declared=sorted(declared or []), atol=affine_atol, voxels=check_voxels)
    check = functools.partial(_check_one, report.root, channels, declared, affine_atol, check_voxels)
    for errors, warnings in checked_cases(report.root, cases, check, settings, cache_dir and Path(cache_dir), workers):
        report.errors += [Problem(*p) for p in errors]
        report.warnings += [Problem(*p) for p in warnings]

    # A file shared by two entries is checked twice; say each of its problems once.
    report.errors = list(dict.fromkeys(report.errors))
    report.warnings = list(dict.fromkeys(report.warnings))
    return report


def _read_meta(report: CheckReport) -> dict | None:
    path = report.root / "dataset.json"
    if not path.is_file():
        where = "" if report.root.is_dir() else f" (the dataset folder {report.root} does not exist)"
        report.errors.append(Problem("dataset.json", f"missing{where}"))
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        report.errors.append(Problem("dataset.json", f"malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}"))
        return None
    except UnicodeDecodeError as e:
        report.errors.append(Problem("dataset.json", f"not UTF-8 text ({e})"))
        return None
    if not isinstance(meta, dict):
        report.errors.append(Problem("dataset.json", "must hold a JSON object at the top level"))
        return None
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        report.errors.append(Problem("dataset.json", f"missing required key(s): {', '.join(missing)}"))
    return meta


def _declared_labels(meta: dict, report: CheckReport) -> set[int] | None:
    """The label values dataset.json declares, or None when they cannot be known (then values go unchecked)."""
    labels = meta.get("labels")
    if labels is None:
        return None
    if not isinstance(labels, dict) or not labels:
        report.errors.append(Problem("dataset.json", "labels must be a non-empty object"))
        return None
    # Not int(): it accepts " 1", "+1" and "1_0", which no loader maps back to a voxel value.
    bad = [k for k in labels if not re.fullmatch(r"[0-9]+", k)]
    for k in bad:
        report.errors.append(Problem("dataset.json", f"labels key {k!r} is not an integer"))
    return {int(k) for k in labels if k not in bad}


def _check_one(
    root: Path, channels: int | None, declared: set[int] | None, affine_atol: float, check_voxels: bool, case
) -> tuple[list, list]:
    """One (image, label) case's problems as ([file, reason], ...) errors and warnings, for `checked_cases`."""
    report = CheckReport(root=root)
    _check_case(report, *case, channels, declared, affine_atol, check_voxels)
    return [[p.file, p.reason] for p in report.errors], [[p.file, p.reason] for p in report.warnings]


def _check_case(
    report: CheckReport,
    image_rel: str,
    label_rel: str,
    channels: int | None,
    declared: set[int] | None,
    affine_atol: float,
    check_voxels: bool,
) -> None:
    image = _load(report, image_rel)
    label = _load(report, label_rel)

    if image is not None:
        if image.ndim not in (3, 4):
            report.errors.append(Problem(image_rel, f"image must be 3D or 4D (X, Y, Z[, C]), got shape {image.shape}"))
            image = None
        else:
            # Channels last, as in MSD Task01: (X, Y, Z, C).
            found = 1 if image.ndim == 3 else image.shape[3]
            if channels is not None and found != channels:
                report.errors.append(
                    Problem(image_rel, f"has {found} channel(s) but dataset.json modality lists {channels}")
                )
    if label is not None and label.ndim != 3:
        report.errors.append(Problem(label_rel, f"label must be 3D, got shape {label.shape}"))
        label = None

    if image is not None and label is not None:
        if image.shape[:3] != label.shape:
            report.errors.append(
                Problem(label_rel, f"shape {label.shape} does not match image {image_rel} shape {image.shape[:3]}")
            )
        diff = float(np.abs(image.affine - label.affine).max())
        if not diff <= affine_atol:
            report.errors.append(
                Problem(
                    label_rel,
                    f"affine differs from image {image_rel} by up to {diff:.4g} (tolerance {affine_atol})",
                )
            )

    if not check_voxels:
        return
    if image is not None and (data := _voxels(report, image_rel, image)) is not None:
        if data.dtype.kind in "fc" and not np.isfinite(data).all():
            report.errors.append(
                Problem(image_rel, f"image has {np.isnan(data).sum()} NaN and {np.isinf(data).sum()} Inf voxel(s)")
            )
    if label is not None and (data := _voxels(report, label_rel, label)) is not None:
        values = np.unique(data)
        if declared is not None:
            undeclared = [v for v in values.tolist() if v not in declared]
            if undeclared:
                shown = ", ".join(f"{v:g}" for v in undeclared[:10])
                more = f" ... ({len(undeclared)} in all)" if len(undeclared) > 10 else ""
                report.errors.append(
                    Problem(label_rel, f"label values not declared in dataset.json labels: {shown}{more}")
                )
        if values.size == 1 and values[0] == 0:
            report.warnings.append(Problem(label_rel, "label has no foreground (all voxels are 0)"))


def _load(report: CheckReport, rel: str) -> nib.Nifti1Image | None:
    """Open one NIfTI file (header only) and check its voxel spacing; None when it cannot be used."""
    path = report.root / rel
    if not path.is_file():
        report.errors.append(Problem(rel, "file does not exist"))
        return None
    try:
        img = nib.load(path)
        if not isinstance(img, nib.Nifti1Image):  # Nifti2Image is a subclass
            report.errors.append(Problem(rel, f"not a NIfTI file (nibabel reads it as {type(img).__name__})"))
            return None
        # nib.load silently turns zero spacing into 1 and negative into its absolute value, so the header as
        # written is read again, unfixed: a loader would train on a spacing the file does not state.
        with ImageOpener(path) as f:
            raw = type(img.header).from_fileobj(f, check=False)
    except _READ_ERRORS as e:
        report.errors.append(Problem(rel, f"not a readable NIfTI file ({e})"))
        return None
    spacing = np.asarray(raw["pixdim"][1:4], dtype=float)
    if not (spacing > 0).all():
        report.errors.append(Problem(rel, f"voxel spacing {spacing.tolist()} is zero, negative or NaN"))
    return img


def _voxels(report: CheckReport, rel: str, img: nib.Nifti1Image) -> np.ndarray | None:
    # dataobj, not get_fdata(): no float64 copy and nothing cached on the image.
    try:
        return np.asanyarray(img.dataobj)
    except _READ_ERRORS as e:
        report.errors.append(Problem(rel, f"cannot read voxel data, file is truncated or corrupt ({e})"))
        return None
