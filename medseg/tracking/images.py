"""Validation slices for W&B: image, ground truth and prediction of a few validation cases as segmentation masks."""

import warnings
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from medseg.tracking.display import axial_view, to_uint8
from medseg.tracking.loggers import log_to_wandb, wandb_loggers


class ValidationImageLogger(pl.Callback):
    """Logs ``val/examples``: the middle axial slice of the first ``num_cases`` validation volumes with the
    ground truth and the prediction as W&B masks (``wandb.Image(masks=...)``), class names from the
    datamodule's ``label_names`` (dataset.json). Only with a W&B logger, on every ``every_n_val_epochs``-th
    validation pass starting with the first.

    The validation step keeps no predictions, so these cases are predicted once more (sliding window, no
    gradients): ``num_cases`` extra volumes every few validation passes.
    """

    def __init__(self, every_n_val_epochs: int = 2, num_cases: int = 3) -> None:
        if every_n_val_epochs < 1:
            raise ValueError(f"every_n_val_epochs must be >= 1, got {every_n_val_epochs}")
        self.every_n_val_epochs, self.num_cases = every_n_val_epochs, num_cases
        self._passes = 0
        self._images: list[Any] = []
        self._active = False  # this validation pass logs images
        self._failed = False  # one failure turns the images off for the run

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        due = not trainer.sanity_checking and self._passes % self.every_n_val_epochs == 0
        self._active = due and not self._failed and bool(wandb_loggers(trainer))
        if not trainer.sanity_checking:
            self._passes += 1
        self._images = []

    @torch.no_grad()
    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if not self._active or len(self._images) >= self.num_cases:
            return
        try:
            self._images.append(self._image(trainer, pl_module, batch, batch_idx))
        except Exception as err:  # noqa: BLE001 - a picture for the dashboard must never stop training
            self._active, self._failed = False, True
            warnings.warn(f"ValidationImageLogger: no validation images ({type(err).__name__}: {err})", stacklevel=2)

    def _image(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> Any:
        import wandb

        plugin = trainer.precision_plugin
        with plugin.forward_context():
            probs = pl_module.predict_probs(plugin.convert_input(batch["image"]))
        # .float() first: numpy has no bfloat16, and the mixed plugin casts labels too
        pred = probs.argmax(1)[0].cpu().numpy().astype(np.uint8)  # (X, Y, Z)
        label = batch["label"][0, 0].float().cpu().numpy().astype(np.uint8)
        image = batch["image"][0, 0].float().cpu().numpy()
        z = image.shape[-1] // 2
        datamodule = getattr(trainer, "datamodule", None)
        names = getattr(datamodule, "label_names", None) or pl_module.label_names
        class_labels = {i: str(n) for i, n in enumerate(names)}
        meta = getattr(batch["image"], "meta", {}) or {}
        source = meta.get("filename_or_obj", [f"case {batch_idx}"])
        case = str(source[0] if isinstance(source, (list, tuple)) else source).rsplit("/", 1)[-1]
        masks = {
            "ground_truth": {"mask_data": axial_view(label, z), "class_labels": class_labels},
            "prediction": {"mask_data": axial_view(pred, z), "class_labels": class_labels},
        }
        return wandb.Image(axial_view(to_uint8(image), z), masks=masks, caption=f"{case} z={z}")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._images:
            # the step Lightning logs this pass's val/dice at (its optimizer step count before the last batch)
            step = max(trainer.global_step - 1, 0)
            for logger in wandb_loggers(trainer):
                log_to_wandb(logger, {"val/examples": self._images, "epoch": trainer.current_epoch}, step)
        self._images = []
