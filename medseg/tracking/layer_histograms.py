"""Per-layer ranges in W&B: on every step ``PrecisionMonitor`` samples per-layer abs-maxes, two histograms of their
log2 (activations, and the scaled gradients reaching each layer's output) under ``precision/layers/``."""

import math

import lightning.pytorch as pl
import numpy as np

from medseg.precision.monitor import PrecisionMonitor
from medseg.tracking.loggers import log_to_wandb, wandb_loggers


def _log2(values: list[float]) -> np.ndarray:
    finite = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    return np.log2(np.maximum(finite, 2.0**-40))


class LayerHistograms(pl.Callback):
    """Listens to the trainer's ``PrecisionMonitor`` (``layer_stats``) and logs its per-layer abs-maxes to every W&B
    logger as histograms. Does nothing without W&B or without the monitor."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        monitor = PrecisionMonitor.of(trainer)
        if monitor is not None and self.log_layers not in monitor.layer_listeners:
            monitor.layer_listeners.append(self.log_layers)

    def log_layers(self, trainer: pl.Trainer, step: int, layer_absmax: dict[str, tuple[float, float]]) -> None:
        """``layer_absmax``: layer -> (activation abs-max, output-gradient abs-max; NaN without a gradient)."""
        loggers = wandb_loggers(trainer)
        if not loggers:
            return
        import wandb

        act = [a for a, _ in layer_absmax.values()]
        grad = [g for _, g in layer_absmax.values()]
        data = {"precision/layers/act_absmax_log2": wandb.Histogram(_log2(act))}
        if any(math.isfinite(g) for g in grad):
            data["precision/layers/act_grad_absmax_log2"] = wandb.Histogram(_log2(grad))
        for logger in loggers:
            log_to_wandb(logger, data, step)
