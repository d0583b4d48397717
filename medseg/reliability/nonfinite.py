"""Stop on inf/NaN losses for every precision, as medseg's mixed plugin does for its own."""

import logging
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from medseg.precision.view import master_weights

log = logging.getLogger(__name__)


class NonFiniteLossGuard(pl.Callback):
    """Skips the update of a step whose loss is inf/NaN and stops after `max_consecutive_skips` in a row.

    Lightning's fp32, bf16 and half precisions apply whatever the gradients hold, so one NaN loss turns every
    weight NaN and training goes on; its AMP GradScaler skips such steps but never stops. Here the gradients of
    that step are dropped before the optimizer sees them (the step is skipped, as GradScaler and medseg's plugin
    skip it, so the weights and the next checkpoint stay good), and after `max_consecutive_skips` skips in a row
    a RuntimeError stops the run, worded as the plugin's; `medseg.train` adds the last good checkpoint. Under
    `+precision=mixed` the plugin already does this (its own `max_consecutive_skips`), so the guard stays out.

    Args:
        max_consecutive_skips: stop once this many steps in a row had an inf/NaN loss.
    """

    def __init__(self, max_consecutive_skips: int = 50) -> None:
        if max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips must be >= 1, got {max_consecutive_skips}")
        self.max_consecutive_skips = max_consecutive_skips
        self.consecutive_skips = 0
        self.loss_finite = True
        self.active = True

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.active = master_weights(trainer) is None

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        # One device sync per step, as the plugin's overflow check costs.
        self.loss_finite = bool(torch.isfinite(loss.detach()).all())

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self.active:
            return
        if self.loss_finite:
            self.consecutive_skips = 0
            return
        optimizer.zero_grad(set_to_none=True)  # parameters without gradients are left as they are
        self.consecutive_skips += 1
        if self.consecutive_skips == 1:
            log.warning("inf/NaN loss at global step %d: the update is skipped", trainer.global_step)
        if self.consecutive_skips >= self.max_consecutive_skips:
            raise RuntimeError(
                f"NonFiniteLossGuard: inf/NaN loss at global step {trainer.global_step}: {self.consecutive_skips}"
                " steps in a row were skipped. Training would only go on with NaN; check the data and the loss,"
                " or lower the learning rate."
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"consecutive_skips": self.consecutive_skips}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.consecutive_skips = state_dict["consecutive_skips"]
