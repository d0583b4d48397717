"""PrecisionMonitor's write-out: the rows its steps buffered go to the host in one transfer, the fields that need a
comparison or a running count are worked out there, and every logger gets them; the sampled steps' per-layer
abs-maxes are summarised, warned about near FP16's maximum, handed to whoever listens (W&B histograms:
``medseg.tracking.layer_histograms``) and to the master-weight plugin's headroom rule.

A mixin of ``medseg.precision.monitor.PrecisionMonitor``, which collects the rows; the host-side results below are
what the run summary, the sweep table, the report and tests read.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from medseg.precision.dtypes import FP16_MAX, headroom_bits
from medseg.precision.view import MasterWeightView

# Called with (trainer, step, layer -> (activation abs-max, output-gradient abs-max)) after each sampled step.
LayerListener = Callable[[pl.Trainer, int, dict[str, tuple[float, float]]], None]


@dataclass
class _Row:
    """A finished step waiting for the next write-out: metric values (host numbers or device tensors) and the
    device-side inputs of the fields worked out on the host."""

    step: int
    voxels: int
    metrics: dict[str, Any] = field(default_factory=dict)
    loss: Tensor | None = None
    scale_used: Tensor | None = None  # GradScaler's scale during this step (AMP), to detect its overflow
    amax: Tensor | None = None  # largest unscaled FP32 gradient element, and the scale to apply to it
    amax_scale: float | Tensor = 1.0
    layers: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None
    events: tuple[Any, Any] | None = None  # CUDA start/end events


class WriteOut:
    """The write-out half of ``PrecisionMonitor`` (see the module docstring)."""

    # host-side results, filled at each write-out (set in PrecisionMonitor.__init__)
    scale_history: list[tuple[int, float, int]]  # (step, loss scale, overflow)
    step_times: list[float]
    peak_memory_mb: float
    skipped_steps: int
    nan_steps: int
    layer_absmax: dict[str, tuple[float, float]]  # name -> (activation, output gradient), at layer_step
    layer_step: int | None
    layer_listeners: list[LayerListener]
    warn_headroom_bits: float
    top_k: int
    _rows: list[_Row]
    _plugin: MasterWeightView | None
    _device: torch.device
    _cuda: bool
    _warned: tuple[str, ...]

    _DEVICE_FIELDS = ("loss", "scale_used", "amax", "amax_scale")

    def _write(self, trainer: pl.Trainer) -> None:
        """Move the buffered rows to the host in one transfer and hand them to every logger."""
        rows, self._rows = self._rows, []
        if not rows:
            return
        if self._cuda:
            rows[-1].events[1].synchronize()
            for row in rows:
                start, end = row.events
                row.metrics["step_time"] = start.elapsed_time(end) / 1000
        # every device tensor of every row (metrics and the host-derived fields' inputs) in one stack
        cells = [(row.metrics, key) for row in rows for key, v in row.metrics.items() if isinstance(v, Tensor)]
        cells += [(row, key) for row in rows for key in self._DEVICE_FIELDS if isinstance(getattr(row, key), Tensor)]
        if cells:

            def get(holder: Any, key: str) -> Tensor:
                return holder[key] if isinstance(holder, dict) else getattr(holder, key)

            values = torch.stack([get(h, k).detach().float().reshape(()).to(self._device) for h, k in cells])
            for (holder, key), value in zip(cells, values.tolist(), strict=True):
                if isinstance(holder, dict):
                    holder[key] = value
                else:
                    setattr(holder, key, value)
        for row in rows:
            metrics = row.metrics
            self._derive(row)
            logged = {f"precision/{k}": float(v) for k, v in metrics.items() if not math.isnan(v)}
            for logger in trainer.loggers:
                logger.log_metrics(logged, step=row.step)
            if "loss_scale" in metrics:
                self.scale_history.append((row.step, metrics["loss_scale"], int(metrics["overflow"])))
            self.step_times.append(metrics["step_time"])
            self.peak_memory_mb = max(self.peak_memory_mb, metrics["peak_memory_mb"])
        for row in rows:
            if row.layers is not None:
                self._write_layers(trainer, row.step, *row.layers)
                self._advise_headroom(trainer, row)

    def _derive(self, row: _Row) -> None:
        """Fields worked out on the host, in step order: running counts, AMP overflow, headroom, throughput."""
        metrics = row.metrics
        if row.loss is not None:
            self.nan_steps += not math.isfinite(row.loss)
            metrics["nan_steps"] = self.nan_steps
        if row.scale_used is not None:
            metrics["overflow"] = int(metrics["loss_scale"] < row.scale_used)
            self.skipped_steps += metrics["overflow"]
            metrics["skipped_steps"] = self.skipped_steps
        elif "skipped_steps" in metrics:
            self.skipped_steps = int(metrics["skipped_steps"])
        if row.amax is not None:
            metrics["fp16_headroom_bits"] = headroom_bits(row.amax * row.amax_scale)
        if row.voxels and metrics["step_time"] > 0:
            metrics["throughput"] = row.voxels / metrics["step_time"]

    def _write_layers(self, trainer: pl.Trainer, step: int, acts: dict, out_grads: dict) -> None:
        names = list(acts)
        nan = torch.full((), math.nan, device=self._device)
        act, grad = torch.stack(
            [torch.stack([acts[n].float() for n in names]), torch.stack([out_grads.get(n, nan).float() for n in names])]
        ).tolist()
        self.layer_absmax = dict(zip(names, zip(act, grad, strict=True), strict=True))
        summary = {}
        for key, values in (("act_absmax", act), ("act_grad_absmax", grad)):
            if not all(math.isnan(v) for v in values):
                summary[f"precision/{key}"] = float(np.nanmax(values))
        for logger in trainer.loggers:
            logger.log_metrics(summary, step=step)
        self._warn_near_fp16_max(step, names, act)
        self.layer_step = step
        for listener in self.layer_listeners:
            listener(trainer, step, self.layer_absmax)

    def _advise_headroom(self, trainer: pl.Trainer, row: _Row) -> None:
        """Hand this sampled step's per-layer abs-maxes to the plugin's headroom rule (``row.amax`` is None where
        the step overflowed, which is the overflow rule's, or had no low-precision gradients)."""
        if self._plugin is None or row.amax is None or row.metrics.get("overflow"):
            return
        acts = {name: act for name, (act, _) in self.layer_absmax.items()}
        grads = {name: grad for name, (_, grad) in self.layer_absmax.items() if not math.isnan(grad)}
        self._plugin.observe_headroom(trainer.lightning_module, row.step, acts, grads, float(row.amax_scale))

    def _warn_near_fp16_max(self, step: int, names: list[str], act: list[float]) -> None:
        # inf (already overflowed) ranks first; NaN says nothing about the range
        ranked = sorted(((v, n) for v, n in zip(act, names, strict=True) if v > 0), reverse=True)
        closest = ranked[: self.top_k]
        if not closest or headroom_bits(closest[0][0]) >= self.warn_headroom_bits:
            return
        if tuple(n for _, n in closest) == self._warned:
            return  # the same layers again: said already
        self._warned = tuple(n for _, n in closest)
        listed = ", ".join(
            f"{n} {v:.4g} ({headroom_bits(v):.1f} bits below)" if math.isfinite(v) else f"{n} inf (overflowed)"
            for v, n in closest
        )
        rank_zero_warn(f"PrecisionMonitor, step {step}: activations closest to the FP16 maximum {FP16_MAX:g}: {listed}")

    def totals(self) -> dict[str, float]:
        """Run-level numbers for the W&B summary: skipped/NaN steps, final scale, peak memory, mean step time
        (the first step, which includes warm-up, left out when there are others)."""
        out: dict[str, float] = {"skipped_steps": self.skipped_steps, "nan_steps": self.nan_steps}
        if self.scale_history:
            out["final_loss_scale"] = self.scale_history[-1][1]
        if self.step_times:
            times = self.step_times[1:] or self.step_times
            out["mean_step_time_s"] = float(np.mean(times))
            out["peak_memory_mb"] = self.peak_memory_mb
        return out
