"""Reading input cases for prediction (in DataLoader workers, so the next cases load while one is predicted) and
writing outputs atomically.

A case that cannot be read or does not fit the checkpoint comes back as an error line naming the file, never as an
exception: the other cases of the folder are still predicted.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medseg.inference.dicom import check_series
from medseg.reliability.atomic_io import write_atomic

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class Case:
    """One input: its preprocessed data dict (image (C, X, Y, Z) MetaTensor with its transform record), or the
    one-line reason it cannot be predicted."""

    path: Path
    data: dict | None = None
    error: str | None = None


def check_header(path: Path, in_channels: int) -> str | None:
    """Why `path` cannot go through a net taking `in_channels` channels (None when it can), from the header."""
    try:
        shape = nib.load(path).shape
    except Exception as err:  # nibabel raises many types for damaged files
        return f"{path}: not a readable NIfTI image ({type(err).__name__}: {err})"
    spatial = shape[:3]
    if len(shape) < 3 or min(spatial) == 1:
        return f"{path}: a 2D image (shape {tuple(shape)}); the checkpoint segments 3D volumes"
    channels = shape[3] if len(shape) == 4 else 1  # MSD layout: (X, Y, Z, C)
    if len(shape) > 4 or channels != in_channels:
        return f"{path}: {channels} channel(s) (shape {tuple(shape)}), the checkpoint expects {in_channels}"
    return None


class CaseDataset(Dataset):
    """`Case`s of `paths`, each checked against the checkpoint's channel count, then preprocessed."""

    def __init__(self, paths: list[Path], preprocess: Callable[[dict], dict], in_channels: int) -> None:
        self.paths, self.preprocess, self.in_channels = paths, preprocess, in_channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Case:
        path = self.paths[index]
        check = check_series if path.is_dir() else check_header  # a folder: a DICOM series
        if (error := check(path, self.in_channels)) is not None:
            return Case(path, error=error)
        try:
            return Case(path, data=self.preprocess({"image": str(path)}))
        except Exception as err:  # MONAI wraps the reader's error; its last line says what went wrong
            reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            return Case(path, error=f"{path}: could not be read and preprocessed ({reason})")


def _single(case: Any) -> Any:
    return case  # batch_size=None hands over one Case at a time, uncollated


def case_loader(dataset: CaseDataset, num_workers: int) -> DataLoader:
    """Cases in order, `num_workers` processes reading and preprocessing ahead (two cases each)."""
    return DataLoader(dataset, batch_size=None, collate_fn=_single, num_workers=num_workers)


def save_mask(path: Path, mask: np.ndarray, affine: np.ndarray) -> Path:
    """uint8 mask (X, Y, Z) as NIfTI, atomically."""
    return write_atomic(path, lambda tmp: nib.save(nib.Nifti1Image(mask, affine), tmp))


def save_probs(path: Path, probs: torch.Tensor) -> Path:
    """Probabilities (C, X, Y, Z) as float16 `probs` in a compressed .npz, atomically (nnU-Net's format)."""

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            np.savez_compressed(f, probs=probs.to(torch.float16).numpy())

    return write_atomic(path, write)


def probs_name(mask_name: str) -> str:
    for suffix in NIFTI_SUFFIXES[::-1]:  # .nii.gz before .nii
        mask_name = mask_name.removesuffix(suffix)
    return mask_name + ".npz"


def mask_name(input_path: Path) -> str:
    """A NIfTI input's own name; `<folder>.nii.gz` for a DICOM series folder."""
    return input_path.name if input_path.name.endswith(NIFTI_SUFFIXES) else f"{input_path.name}.nii.gz"


OUTPUT_FORMATS = {"nifti": ("nifti",), "dicom_seg": ("dicom_seg",), "both": ("nifti", "dicom_seg")}


def output_formats(choice: str, inputs: list[Path]) -> tuple[str, ...]:
    """The formats `output_format` names; a one-line ValueError for an unknown one, or DICOM SEG of a NIfTI input
    (a SEG references the DICOM series it segments)."""
    if choice not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}, got {choice!r}")
    formats = OUTPUT_FORMATS[choice]
    if "dicom_seg" in formats and (nifti := next((p for p in inputs if not p.is_dir()), None)) is not None:
        raise ValueError(f"output_format={choice}: {nifti} is not a DICOM series (a SEG references its series)")
    return formats


def output_names(input_path: Path, formats: Sequence[str], with_probs: bool) -> list[str]:
    """The files predicting `input_path` writes: the NIfTI mask, `<series>.seg.dcm`, `<mask>.npz`."""
    names = [mask_name(input_path)] if "nifti" in formats else []
    names += [f"{input_path.name}.seg.dcm"] if "dicom_seg" in formats else []
    return names + ([probs_name(mask_name(input_path))] if with_probs else [])
