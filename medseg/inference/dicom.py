"""DICOM series as prediction inputs: one series per folder, read by MONAI's PydicomReader (LoadImage picks it for
a folder), which stacks the slices in InstanceNumber order and builds the RAS affine from the first slice's
ImagePositionPatient, ImageOrientationPatient and PixelSpacing and the last slice's position.

That reader trusts the headers, so `check_series` reads them first (no pixels) and names the file and the fault of
a series it would read wrongly: mixed series, a non-image object, a compressed transfer syntax without a decoder,
slices that disagree on orientation or size, duplicate or missing slices, uneven spacing, an InstanceNumber order
that is not the slices' order in space.
"""

from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

# Relative tolerance on slice steps (DICOM positions carry at most 16 characters) and on direction cosines.
STEP_TOLERANCE = 0.01
ORIENTATION_TOLERANCE = 1e-4


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files directly in `folder` (by their preamble), sorted by name."""
    files = (p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    return sorted(p for p in files if pydicom.misc.is_dicom(p))


def series_folders(folder: Path) -> list[Path]:
    """The DICOM series under `folder`: itself if it holds DICOM files, else its subfolders that do."""
    if dicom_files(folder):
        return [folder]
    return sorted(p for p in folder.iterdir() if p.is_dir() and dicom_files(p))


def _decoder_missing(ds: pydicom.Dataset) -> str | None:
    syntax = ds.file_meta.TransferSyntaxUID
    if not syntax.is_compressed:
        return None
    try:
        available = pydicom.pixels.get_decoder(syntax).is_available
    except NotImplementedError:
        available = False
    return None if available else f"pixel data compressed as {syntax.name}, and no installed decoder reads it"


def check_series(folder: Path, in_channels: int = 1) -> str | None:
    """Why the series in `folder` cannot be read as one 3D image (None when it can): one line naming the file."""
    files = dicom_files(folder)
    if not files:
        return f"{folder}: no DICOM files"
    if in_channels != 1:
        return f"{folder}: a DICOM series has 1 channel, the checkpoint expects {in_channels}"
    headers = []
    for path in files:
        try:
            headers.append((path, pydicom.dcmread(path, stop_before_pixels=True)))
        except (InvalidDicomError, OSError, ValueError) as err:
            return f"{path}: not a readable DICOM file ({err})"
    first_path, first = headers[0]
    for path, ds in headers:
        if ds.get("SeriesInstanceUID") != first.get("SeriesInstanceUID"):
            return (f"{path}: series {ds.get('SeriesInstanceUID')} mixed with {first.get('SeriesInstanceUID')} "
                    f"({first_path.name}); put each series in its own folder")  # fmt: skip
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds or "Rows" not in ds:
            sop = ds.get("SOPClassUID")
            return f"{path}: {getattr(sop, 'name', sop)}, not an image slice with a position and orientation"
        if int(ds.get("NumberOfFrames", 1)) > 1:
            return f"{path}: a multi-frame image; one slice per file is read"
        if (reason := _decoder_missing(ds)) is not None:
            return f"{path}: {reason}"
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
            return f"{path}: {ds.Rows} x {ds.Columns} pixels, {first_path.name} has {first.Rows} x {first.Columns}"
        if not np.allclose(ds.ImageOrientationPatient, first.ImageOrientationPatient, atol=ORIENTATION_TOLERANCE):
            return f"{path}: ImageOrientationPatient differs from {first_path.name}'s"
    if len(headers) < 2:
        return f"{first_path}: a single slice; the checkpoint segments 3D volumes"
    return _check_positions(headers)


def _check_positions(headers: list[tuple[Path, pydicom.Dataset]]) -> str | None:
    """Slices one step apart along the slice normal, in InstanceNumber order (the order the reader stacks)."""
    orientation = np.asarray(headers[0][1].ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    by_number = sorted(headers, key=lambda h: int(h[1].get("InstanceNumber", 0)))
    where = [(float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float))), path) for path, ds in by_number]
    in_space = sorted(where)
    for (pos, path), (prev, prev_path) in zip(in_space[1:], in_space, strict=False):
        if abs(pos - prev) < 1e-3:
            return f"{path}: duplicate slice, at the position of {prev_path.name} ({pos:.3f} mm along the normal)"
    steps = np.diff([pos for pos, _ in in_space])
    step = float(np.median(steps))
    for (_, path), (_, prev_path), gap in zip(in_space[1:], in_space[:-1], steps, strict=True):
        if abs(gap - step) > STEP_TOLERANCE * step:
            missing = round(gap / step) - 1
            if missing >= 1 and abs(gap - (missing + 1) * step) <= STEP_TOLERANCE * step:
                return (f"{path}: {missing} missing slice(s) between it and {prev_path.name} ({gap:.3f} mm apart, "
                        f"the other slices {step:.3f} mm)")  # fmt: skip
            return (f"{path}: uneven slice spacing ({gap:.3f} mm between it and {prev_path.name}, {step:.3f} mm "
                    "elsewhere)")  # fmt: skip
    order, spatial = [p for _, p in where], [p for _, p in in_space]
    if order not in (spatial, spatial[::-1]):
        path = next(a for a, b in zip(order, spatial, strict=True) if a != b)
        number = int(dict(headers)[path].InstanceNumber)
        return f"{path}: InstanceNumber {number} does not follow the slices' order in space"
    return None
