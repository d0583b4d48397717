"""SegmentationModule: a MONAI network, its loss, optimizer and schedule, and sliding-window validation."""

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.networks.utils import one_hot
from monai.transforms import KeepLargestConnectedComponent
from torch import nn

from medseg.inference import postprocess
from medseg.models.channels_last import to_channels_last
from medseg.models.class_dice import ClassDice
from medseg.models.class_table import log_class_table
from medseg.models.loss import deep_supervision_loss
from medseg.models.sliding_window import mirror_flips, sliding_window_probs
from medseg.precision.convert import convert_net
from medseg.precision.dtypes import inference_dtype
from medseg.precision.precision_plan import saved_fp32_modules
from medseg.precision.view import master_weights


class SegmentationModule(pl.LightningModule):
    """Args:
    net: a 3D network mapping (B, C_in, X, Y, Z) to (B, C_out, X, Y, Z) logits; with deep supervision
        (MONAI DynUNet in training mode) (B, S, C_out, X, Y, Z), head 0 the full-resolution output.
    loss: called as loss(logits float32, labels (B, 1, X, Y, Z) class indices).
    optimizer: partial optimizer, called with the parameters.
    scheduler: partial `medseg.models.schedule.warmup_decay`, called with the optimizer and total steps.
    label_names: class names, index 0 background (from dataset.json).
    roi_size: sliding-window ROI, the training patch size.
    sw_batch_size, overlap, sw_mode: `monai.inferers.sliding_window_inference` settings.
    test_mirror_axes: spatial axes (0, 1, 2) whose flips are averaged at test time (and by `medseg.predict`
        unless it is told otherwise): nnU-Net's mirroring, 2^len passes. Validation during training uses none.
    inference: what `medseg.predict` needs to rebuild the net and preprocessing (net config, spacing,
        modality...); only stored in the checkpoint's hyper-parameters.
    channels_last: hold conv weights and feed inputs in `torch.channels_last_3d` (NDHWC), with instance norms
        that keep that layout (`medseg.models.channels_last`). `"auto"`: on CPU only, where oneDNN's NDHWC
        convolutions make steps faster; on an H200 it gained nothing and took more memory (benchmarks/RESULTS.md,
        "Training step speed and memory per precision").
    compile: `torch.compile` the net (parameter names and checkpoints unchanged).
        Costs a compile at the start for faster steps (benchmarks/RESULTS.md, "Training step speed and memory per
        precision").
    test_dtype: `fp32`, `bf16`, `fp16` or `auto` (fp16 on CUDA, bf16 on CPU): the test pass converts the net
        as `medseg.predict dtype=` does and stitches in that dtype; None: the training precision.

    The test pass also measures each class's Dice after keep-largest-connected-component and writes which classes
    it helps beside the tested checkpoint (`medseg.inference.postprocess`), for `medseg.predict`.
    """

    def __init__(
        self,
        net: nn.Module,
        loss: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        label_names: Sequence[str] = ("background", "foreground"),
        roi_size: Sequence[int] = (64, 64, 64),
        sw_batch_size: int = 4,
        overlap: float = 0.5,
        sw_mode: str = "gaussian",
        inference: dict | None = None,
        channels_last: bool | Literal["auto"] = False,
        compile: bool = False,
        test_mirror_axes: Sequence[int] = (),
        test_dtype: str | None = None,
    ) -> None:
        super().__init__()
        # plain ints before save_hyperparameters: a ListConfig from Hydra would make the checkpoint unloadable
        # with weights_only=True; a bad axis fails here, not after training
        try:
            test_mirror_axes = [int(a) for a in test_mirror_axes]
            mirror_flips(test_mirror_axes)
        except (TypeError, ValueError) as err:
            raise ValueError(f"test_mirror_axes: {err}") from None
        if test_dtype is not None:
            try:  # a bad name fails here, not after training
                inference_dtype(test_dtype, torch.device("cpu"))
            except ValueError as err:
                raise ValueError(f"test_{err}") from None
        if channels_last not in (True, False, "auto"):
            raise ValueError(f"channels_last: must be true, false or 'auto', got {channels_last!r}")
        self.save_hyperparameters(ignore=["net", "loss", "optimizer", "scheduler"])
        self.net, self.loss_fn = net, loss
        self.optimizer_fn, self.scheduler_fn = optimizer, scheduler
        self.label_names = list(label_names)
        self.dice = DiceMetric(include_background=False, reduction="mean_batch")
        # validation: the same numbers from voxel counts, without two one-hot copies of C channels per volume
        self.val_dice = ClassDice(len(self.label_names))
        self.per_class: dict[str, list[float]] = {}  # "<stage>/<metric>" -> the last epoch's value per class
        self.hd95 = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="mean_batch")
        self.dice_lcc = DiceMetric(include_background=False, reduction="mean_batch")
        self.keep_largest = KeepLargestConnectedComponent(
            applied_labels=list(range(1, len(self.label_names))), is_onehot=True, independent=True
        )
        self.test_torch_dtype: torch.dtype | None = None  # set by on_test_start from test_dtype
        # the precision plan's FP32 modules saved in the checkpoint last loaded (on_load_checkpoint), for test_dtype
        self.saved_fp32_modules: list[str] = []
        self.test_cases = 0  # cases of the current test pass, for the postprocessing record
        self.channels_last = channels_last
        self._compiled_net: nn.Module | None = None

    def setup(self, stage: str) -> None:
        # before the strategy moves and converts the net, so the masters and optimizer state inherit the layout
        if self.channels_last == "auto":
            self.channels_last = self.trainer.strategy.root_device.type == "cpu"
        if self.channels_last:
            to_channels_last(self.net)
        if self.hparams.compile and self._compiled_net is None:
            # torch.compile's wrapper, kept out of the module tree (object.__setattr__) so parameter names and
            # checkpoints stay those of the plain net. Not `self.net.compile()`: torch 2.13's CPU build silently
            # runs such a module uncompiled. Static shapes: training patches and sliding windows come in a few
            # fixed sizes, and the dynamic-shape recompile failed in Inductor (torch 2.13, CPU).
            object.__setattr__(self, "_compiled_net", torch.compile(self.net, dynamic=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, X, Y, Z) -> logits in the net's dtype (see the class docstring for deep supervision)."""
        if self.channels_last is True and x.ndim == 5:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return (self.net if self._compiled_net is None else self._compiled_net)(x)

    def compute_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss in FP32, deep supervision heads weighted (`medseg.models.loss.deep_supervision_loss`)."""
        return deep_supervision_loss(self.loss_fn, logits, labels)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(self(batch["image"]), batch["label"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def predict_probs(
        self, image: torch.Tensor, mirror_axes: Sequence[int] = (), dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Whole-volume class probabilities (B, C_out, X, Y, Z), float32 or `dtype` (the net must hold it), by
        gaussian-blended sliding windows."""
        return sliding_window_probs(
            self,
            image,
            roi_size=self.hparams.roi_size,
            sw_batch_size=self.hparams.sw_batch_size,
            overlap=self.hparams.overlap,
            mode=self.hparams.sw_mode,
            mirror_axes=mirror_axes,
            dtype=dtype,
        )

    def _one_hot_pair(
        self, batch: dict, mirror_axes: Sequence[int] = (), dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.predict_probs(batch["image"], mirror_axes, dtype)
        n = len(self.label_names)
        return one_hot(probs.argmax(1, keepdim=True), n), one_hot(batch["label"].long(), n)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.val_dice(self.predict_probs(batch["image"]).argmax(1, keepdim=True), batch["label"])

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.saved_fp32_modules = saved_fp32_modules(checkpoint)

    def on_test_start(self) -> None:
        self.test_cases = 0
        if self.hparams.test_dtype is not None:
            # in place, after Lightning loaded the tested checkpoint's weights (a `mixed` run's are BF16/FP16 there:
            # test_dtype=fp32 does not bring back its FP32 masters; medseg.predict loads those). The modules kept in
            # FP32 by the tested checkpoint's plan, and by the running plugin's (test right after fit), stay FP32.
            plugin = master_weights(self.trainer)
            running = plugin.precision_plan.fp32_modules if plugin is not None else []
            self.test_torch_dtype = inference_dtype(self.hparams.test_dtype, self.device)
            convert_net(self.net, self.test_torch_dtype, [*dict.fromkeys([*self.saved_fp32_modules, *running])])

    def test_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        """Returns this batch's one-hot prediction `pred` (B, C, X, Y, Z) and per-case `dice` and `hd95` (B, C-1),
        float32, for callbacks (`medseg.tracking.case_table.CaseTableLogger`)."""
        pred, target = self._one_hot_pair(batch, self.hparams.test_mirror_axes, self.test_torch_dtype)
        dice = self.dice(pred, target)
        self.dice_lcc(torch.stack([self.keep_largest(p) for p in pred]), target)
        self.test_cases += pred.shape[0]
        # Validation volumes are at the target spacing, so this makes HD95 millimetres.
        spacing = (self.hparams.inference or {}).get("spacing")
        hd95 = self.hd95(pred, target, spacing=spacing)
        return {"pred": pred, "dice": dice, "hd95": hd95}

    def _log_per_class(self, stage: str, name: str, metric) -> torch.Tensor:
        """`<stage>/<name>` (the mean over classes) and each class's value: as `<stage>/<name>/<label>` keys up to
        `class_table.PER_CLASS_KEYS` classes, else as one table (`medseg.models.class_table`)."""
        values = metric.aggregate()
        metric.reset()
        self.log(f"{stage}/{name}", values.nanmean(), prog_bar=stage == "val", sync_dist=True)
        self.per_class[f"{stage}/{name}"] = values.tolist()
        if not log_class_table(self, f"{stage}/{name}", self.label_names[1:], values):
            for label, value in zip(self.label_names[1:], values, strict=True):
                self.log(f"{stage}/{name}/{label}", value, sync_dist=True)
        return values

    def on_validation_epoch_end(self) -> None:
        self._log_per_class("val", "dice", self.val_dice)

    def on_test_epoch_end(self) -> None:
        dice = self._log_per_class("test", "dice", self.dice)
        dice_lcc = self._log_per_class("test", "dice_lcc", self.dice_lcc)
        self._log_per_class("test", "hd95", self.hd95)
        ckpt = self.trainer.ckpt_path
        if ckpt and self.trainer.is_global_zero:
            record = postprocess.decide(self.label_names, dice.tolist(), dice_lcc.tolist(), self.test_cases)
            postprocess.save(record, postprocess.decision_path(Path(ckpt)))

    def configure_optimizers(self):
        optimizer = self.optimizer_fn(self.parameters())
        if self.scheduler_fn is None:
            return optimizer
        # A function, read at the first decaying step: see warmup_decay for why not now.
        scheduler = self.scheduler_fn(optimizer, total_steps=lambda: self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
