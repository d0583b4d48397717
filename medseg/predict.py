"""Inference: `python -m medseg.predict ckpt_path=<ckpt, [ckpts] or folder of fold runs> input=<file or folder>
output=<folder> [dtype=auto] [postprocessing=auto]`.

Each input NIfTI gets one uint8 mask of the same name in `output`, with the input's exact shape and affine (a DICOM
series, one per folder: `<folder>.nii.gz`, on the series' voxel grid; medseg.inference.dicom):
the preprocessing (orientation, resampling, cropping, padding) is inverted with MONAI's `Invertd`. Several
checkpoints (an ensemble) average their softmax. Cases that cannot be predicted are named, the others predicted,
and the command exits with status 1 listing them at the end.
"""

import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import hydra
import nibabel as nib
from omegaconf import DictConfig
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from medseg import CONF_DIR
from medseg.checkpoint import CheckpointError
from medseg.inference import dicom
from medseg.inference.cases import (
    NIFTI_SUFFIXES,
    Case,
    CaseDataset,
    case_loader,
    mask_name,
    output_formats,
    output_names,
    probs_name,
    save_mask,
    save_probs,
)
from medseg.inference.dicom_seg import write_seg
from medseg.inference.predictor import Predictor
from medseg.reliability.atomic_io import PARTIAL

log = logging.getLogger(__name__)


class CasesFailed(RuntimeError):
    """Some cases could not be predicted; the message lists them, one line each. `written`: the masks written."""

    def __init__(self, failures: list[str], written: list[Path]) -> None:
        super().__init__(f"{len(failures)} case(s) not predicted:\n" + "\n".join(failures))
        self.failures, self.written = failures, written


def list_inputs(input_path: Path) -> list[Path]:
    """NIfTI files, and DICOM series as folders (`input` itself, or its subfolders: one series per folder)."""
    if input_path.is_file():
        return [input_path]
    if input_path.is_dir():
        files = sorted(
            p for p in input_path.iterdir() if p.name.endswith(NIFTI_SUFFIXES) and not p.name.startswith(PARTIAL)
        )
        files += dicom.series_folders(input_path)
        if not files:
            raise FileNotFoundError(f"input={input_path}: no .nii/.nii.gz files or DICOM series in this folder")
        return files
    raise FileNotFoundError(f"input={input_path}: no such file or folder")


def check_output_folder(inputs: list[Path], output: Path) -> None:
    """Refuse an output folder that is, or lies inside, a folder holding inputs: masks would sit beside (or
    overwrite) the images they came from."""
    out = output.resolve()
    for folder in {p.resolve() if p.is_dir() else p.resolve().parent for p in inputs}:
        if out == folder or folder in out.parents:
            raise ValueError(f"output={output} is inside the input folder {folder}; choose a folder outside it")


def pending(
    inputs: list[Path], output: Path, overwrite: bool, with_probs: bool, formats: Sequence[str] = ("nifti",)
) -> tuple[list[Path], int]:
    """The inputs whose outputs are still to be written (all with `overwrite`), and how many were skipped."""
    if overwrite:
        return inputs, 0
    todo = [p for p in inputs if not all((output / n).is_file() for n in output_names(p, formats, with_probs))]
    return todo, len(inputs) - len(todo)


def progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("predict"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("cases"),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
        disable=not enabled,
    )


def predict(cfg: DictConfig) -> list[Path]:
    """Predict every input case; returns the masks written. Raises CasesFailed at the end if some cases could not
    be predicted (after predicting all the others)."""
    inputs = list_inputs(Path(cfg.input))
    output = Path(cfg.output)
    check_output_folder(inputs, output)
    formats = output_formats(cfg.get("output_format", "nifti"), inputs)
    predictor = Predictor(
        cfg.ckpt_path,
        cfg.device,
        cfg.sw_batch_size,
        cfg.overlap,
        cfg.allow_unsafe_checkpoint,
        cfg.mirror_axes,
        cfg.dtype,
        cfg.postprocessing,
        cfg.get("sum_dtype", "auto"),
    )
    todo, skipped = pending(inputs, output, cfg.overwrite, cfg.save_probs, formats)
    if skipped:
        log.info("%d case(s) already predicted in %s, skipped (overwrite=true predicts them again)", skipped, output)
    output.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    failures: list[str] = []
    start = time.perf_counter()
    loader = case_loader(CaseDataset(todo, predictor.preprocess, predictor.in_channels), cfg.num_workers)
    with progress_bar(cfg.progress) as bar:
        task = bar.add_task("predict", total=len(todo))
        for case in loader:
            if (error := _predict_case(predictor, case, output, cfg.save_probs, written, formats)) is not None:
                failures.append(error)
                log.error(error)
            bar.advance(task)
    seconds = time.perf_counter() - start
    print(f"wrote {len(written)} mask(s) to {output} in {seconds:.1f} s; {skipped} skipped, {len(failures)} failed")
    if failures:
        raise CasesFailed(failures, written)
    return written


def _predict_case(
    predictor: Predictor,
    case: Case,
    output: Path,
    with_probs: bool,
    written: list[Path],
    formats: Sequence[str] = ("nifti",),
) -> str | None:
    """Predict and write one case (`formats`: "nifti", "dicom_seg"); the error line if it could not be."""
    if case.error is not None:
        return case.error
    assert case.data is not None
    try:
        mask, probs = predictor.predict_case(case.data, with_probs)
        # a DICOM series' RAS affine as its reader built it from the headers
        affine = case.data["image"].meta["original_affine"] if case.path.is_dir() else nib.load(case.path).affine
        outs = [save_mask(output / mask_name(case.path), mask, affine)] if "nifti" in formats else []
        if "dicom_seg" in formats:
            outs.append(write_seg(mask, case.path, predictor.label_names, output / f"{case.path.name}.seg.dcm"))
        if probs is not None:
            save_probs(output / probs_name(mask_name(case.path)), probs)
    except (RuntimeError, ValueError, OSError) as err:
        return f"{case.path}: prediction failed ({type(err).__name__}: {str(err).strip().splitlines()[0]})"
    log.info("%s -> %s %s", case.path, ", ".join(map(str, outs)), mask.shape)
    written.extend(outs)
    return None


# Errors about the user's input or the cases, reported in one line (or one line per case) without a traceback.
INPUT_ERRORS = (CheckpointError, CasesFailed, FileNotFoundError, ValueError)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="predict")
def main(cfg: DictConfig) -> None:
    try:
        predict(cfg)
    except INPUT_ERRORS as error:
        print(f"medseg: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
