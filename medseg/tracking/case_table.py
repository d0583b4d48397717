"""The per-case table a reviewer sorts failures by: case id, Dice and HD95 per class, and an axial slice with the
label and the prediction as W&B masks. Logged as `test/cases` by the test pass after training (`CaseTableLogger`) and
by `medseg.evaluate` when it scores predictions against labels."""

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np

from medseg.tracking.display import axial_view, to_uint8
from medseg.tracking.loggers import log_to_wandb, wandb_loggers

TABLE_KEY = "test/cases"


def busiest_slice(label: np.ndarray, pred: np.ndarray) -> int:
    """The axial index (Z of an (X, Y, Z) volume) with the most labelled voxels, else the most predicted ones,
    else the middle: the slice that shows the structure, not empty background."""
    for mask in (label, pred):
        counts = (mask > 0).sum(axis=(0, 1))
        if counts.max() > 0:
            return int(counts.argmax())
    return label.shape[-1] // 2


def overlay(label: np.ndarray, pred: np.ndarray, label_names: Sequence[str], image: np.ndarray | None = None,
            caption: str = "") -> Any:  # fmt: skip
    """A `wandb.Image` of one axial slice with `label` and `pred` (integer (X, Y, Z) volumes) as masks over `image`
    ((X, Y, Z) intensities; without one, the label itself is the grey background)."""
    import wandb

    z = busiest_slice(label, pred)
    if image is not None:
        base = axial_view(to_uint8(image), z)
    else:  # classes as grey levels
        base = axial_view((label * (255 // max(len(label_names) - 1, 1))).astype(np.uint8), z)
    classes = {i: str(n) for i, n in enumerate(label_names)}
    masks = {
        "ground_truth": {"mask_data": axial_view(label, z).astype(np.uint8), "class_labels": classes},
        "prediction": {"mask_data": axial_view(pred, z).astype(np.uint8), "class_labels": classes},
    }
    return wandb.Image(base, masks=masks, caption=f"{caption} z={z}".strip())


def columns(label_names: Sequence[str]) -> list[str]:
    classes = list(label_names)[1:]
    return ["case", *(f"dice/{c}" for c in classes), *(f"hd95/{c}" for c in classes), "slice"]


def row(case: str, dice: Sequence[float], hd95: Sequence[float], image: Any) -> list:
    """One table row; NaN (a class absent from label and prediction) or inf (absent from one of them, HD95)
    becomes None, an empty cell."""
    clean = [None if v is None or not math.isfinite(float(v)) else float(v) for v in [*dice, *hd95]]
    return [case, *clean, image]


def case_table(rows: list[list], label_names: Sequence[str]) -> Any:
    import wandb

    return wandb.Table(columns=columns(label_names), data=rows)


def case_name(batch: dict, index: int, files: Sequence[dict] | None, position: int) -> str:
    """The file name of case `index` of a batch: from its image's `filename_or_obj` meta (a MONAI MetaTensor), else
    the `position`-th entry of `files` (the dataloader's datalist, read in order), else `case <position>`."""
    source = (getattr(batch["image"], "meta", None) or {}).get("filename_or_obj")
    if isinstance(source, (list, tuple)) and index < len(source):
        return Path(str(source[index])).name
    if files is not None and position < len(files):
        return Path(str(files[position]["image"])).name
    return f"case {position}"


class CaseTableLogger(pl.Callback):
    """Logs `test/cases` at the end of a test pass with a W&B logger: one row per tested case from the module's
    `test_step` outputs (`pred` one-hot (B, C, X, Y, Z), per-case `dice`/`hd95` (B, C-1)). Each case's slice is
    rendered as it is tested, so only small 2D images are kept. A failure warns once and leaves the test running."""

    def __init__(self) -> None:
        self.rows: list[list] = []
        self.failed = False

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rows = []

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        if self.failed or not isinstance(outputs, dict) or not wandb_loggers(trainer):
            return
        try:
            # the test dataloader reads the validation datalist in order (batch size 1, no sampler) in one process
            files = getattr(trainer.datamodule, "val_files", None) if trainer.world_size == 1 else None
            self._add(outputs, batch, pl_module.label_names, files)
        except Exception as err:  # noqa: BLE001 - a table for the dashboard must never stop the test
            self.failed = True
            warnings.warn(f"CaseTableLogger: no per-case table ({type(err).__name__}: {err})", stacklevel=2)

    def _add(self, outputs: dict, batch: dict, label_names: Sequence[str], files: Sequence[dict] | None) -> None:
        preds = outputs["pred"].argmax(1).cpu().numpy()  # (B, X, Y, Z)
        labels = batch["label"][:, 0].float().cpu().numpy().astype(np.int64)
        images = batch["image"][:, 0].float().cpu().numpy()
        dice, hd95 = outputs["dice"].float().cpu().tolist(), outputs["hd95"].float().cpu().tolist()
        for i in range(preds.shape[0]):
            case = case_name(batch, i, files, len(self.rows))
            image = overlay(labels[i], preds[i], label_names, images[i], caption=case)
            self.rows.append(row(case, dice[i], hd95[i], image))

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.rows and trainer.is_global_zero:
            table = case_table(self.rows, pl_module.label_names)
            for logger in wandb_loggers(trainer):
                log_to_wandb(logger, {TABLE_KEY: table}, trainer.global_step)
        self.rows = []


class EvaluationTable:
    """`medseg.evaluate`'s per-case hook: collects each scored case as a row (the slice over the same-named image
    in `images_dir` when there is one on the label's grid, else over the label), then `log` writes `test/cases` and
    the means (`test/dice`, `test/dice/<class>`, `test/hd95/<class>`) as one W&B run."""

    def __init__(self, images_dir: Path) -> None:
        self.images_dir = Path(images_dir)
        self.rows: list[list] = []
        self.label_names: list[str] = []

    def __call__(self, name: str, pred: np.ndarray, label: np.ndarray, dice: Sequence[float],
                 hd95: Sequence[float], label_names: Sequence[str]) -> None:  # fmt: skip
        self.label_names = list(label_names)
        self.rows.append(row(name, dice, hd95, overlay(label, pred, label_names, self._image(name, label.shape), name)))

    def _image(self, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
        import nibabel as nib

        path = self.images_dir / name
        if not path.is_file():
            return None
        image = np.asarray(nib.load(path).dataobj, dtype=np.float32)
        image = image[..., 0] if image.ndim == 4 else image  # MSD stores channels last: the first modality
        return image if image.shape == tuple(shape) else None

    def log(self, summary: dict[str, float], config: dict, mode: str, project: str, dir: str) -> Path:
        """One W&B run (job type `evaluate`) with the table and the means; returns its run folder."""
        import wandb

        Path(dir).mkdir(parents=True, exist_ok=True)
        run = wandb.init(project=project, mode=mode, dir=dir, job_type="evaluate", config=config)
        try:
            means = {f"test/{k}": None if math.isnan(v) else v for k, v in summary.items()}
            run.log({TABLE_KEY: case_table(self.rows, self.label_names), **means})
        finally:
            run.finish()
        return Path(run.dir).parent
