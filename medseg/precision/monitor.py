"""PrecisionMonitor: the numbers a mixed-precision run must show to be trusted, for any precision.

Logged under ``precision/`` at the step Lightning logs that batch's ``train/loss`` at, so the curves line up:

================== ======================================================= ========================================
key                meaning                                                 precisions
================== ======================================================= ========================================
loss_scale         the loss scale after this step's update                 ``mixed``, ``16-mixed`` (GradScaler)
overflow           1 where the step was skipped for inf/NaN gradients      same
skipped_steps      skipped optimizer steps so far                          same
nan_steps          steps whose loss was inf/NaN so far                     all
grad_norm          global L2 norm of the unscaled FP32 gradients           all (the low grads in ``*-true``)
step_time          seconds from batch start to the end of the step         all
throughput         voxels (batch x X x Y x Z) per second                   all
peak_memory_mb     CUDA allocator peak, or the process' peak RSS on CPU    all
-- costly steps --
fp16_headroom_bits log2(65504 / max abs scaled gradient)                   all but fp32
grad_zero_frac     low-precision gradient elements that are 0 or subnormal all but fp32
update_lost_frac   master updates a low-precision weight would not show    ``mixed``, ``*-mixed``
act_absmax         largest activation abs-max over layers                  all
act_grad_absmax    largest abs-max of a layer's output gradient (scaled)   all
================== ======================================================= ========================================

Cheap metrics are kept on the device every step and written, with one host sync, on every ``every_n_steps``-th
step; the costly ones are computed on those steps only. Per-layer abs-maxes also go to W&B as histograms, and a
warning names the layers whose activations come closest to the FP16 maximum. At the default settings the
callback took 1.6-2.2% of the step time of a tiny 3D U-Net (35k parameters, 2x32^3 batch) on one CPU thread,
measured as the time spent inside its hooks; larger models pay relatively less (its cost is per tensor and layer,
not per voxel, except for the sampled steps' abs-maxes).
"""

import math
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from medseg.precision.layer_ranges import LayerRanges, first_tensor
from medseg.precision.plugin import MasterWeightPrecision
from medseg.tracking.loggers import log_to_wandb, wandb_loggers

FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504
LOW_DTYPE_OF = {
    "16-mixed": torch.float16,
    "bf16-mixed": torch.bfloat16,
    "16-true": torch.float16,
    "bf16-true": torch.bfloat16,
}


@dataclass
class _Step:
    """Scratch of the optimizer step in progress, from its first micro-batch to ``on_train_batch_end``."""

    step: int
    voxels: int
    costly: bool
    start: Any  # time.perf_counter() on CPU, a recorded CUDA event on GPU
    scale_used: float | Tensor | None = None
    norms: list[Tensor] = field(default_factory=list)
    amaxes: list[Tensor] = field(default_factory=list)
    zero_counts: list[tuple[Tensor, int]] = field(default_factory=list)
    masters: list[tuple[list[Tensor], Tensor]] = field(default_factory=list)


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


def _voxels(batch: Any) -> int:
    """Voxels in the batch's image: batch x spatial size, channels not counted."""
    image = batch.get("image") if isinstance(batch, dict) else first_tensor(batch)
    if not isinstance(image, Tensor) or image.ndim < 3:
        return 0
    return image.numel() // image.shape[1]


class PrecisionMonitor(pl.Callback):
    """Logs loss scaling, gradient health, lost updates, per-layer ranges and speed under ``precision/``.

    Works for medseg's ``MasterWeightPrecision`` plugin (told apart with ``isinstance``), Lightning's AMP
    (``16-mixed``, ``bf16-mixed``), ``16-true``/``bf16-true`` and FP32; a metric that does not apply to the
    precision is not logged at all. See the module docstring for the keys.

    How the costly metrics are obtained:

    - ``grad_zero_frac``: the plugin releases its low-precision gradients once they are copied into the FP32
      masters, so they are rebuilt as ``(master_grad * scale).to(low dtype)``. The masters hold exactly
      ``low_grad / scale``, so with a power-of-two scale (the default, and every scale reached by halving and
      doubling it) this gives back the low gradients bit for bit. Under AMP every parameter gradient is counted
      as it would be in the low dtype (autocast keeps some layers in FP32); under ``*-true`` the gradients are
      the low ones.
    - ``update_lost_frac``: the FP32 weights are copied before the optimizer step; an element counts as lost when
      it changed but ``round_low(round_low(before) + (after - before)) == round_low(before)``, i.e. applying the
      same update to the low-precision weight would have left it unchanged.
    - per-layer abs-max: ``medseg.precision.layer_ranges.LayerRanges``, hooked in for the sampled step only.

    Args:
        every_n_steps: costly metrics, and the write-out of the buffered cheap ones, on every n-th step;
            ``None`` uses ``trainer.log_every_n_steps``.
        layer_stats: per-layer activation and output-gradient abs-max on the costly steps.
        warn_headroom_bits: warn when a layer's activation abs-max comes within this many powers of two of the
            FP16 maximum (65504); the warning names the ``top_k`` closest layers.
        top_k: number of layers the warning names.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        layer_stats: bool = True,
        warn_headroom_bits: float = 4.0,
        top_k: int = 3,
    ) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1 or None, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.layer_stats = layer_stats
        self.warn_headroom_bits = warn_headroom_bits
        self.top_k = top_k
        # host-side results, filled at each write-out: read by the W&B summary, the report and tests
        self.scale_history: list[tuple[int, float, int]] = []  # (step, loss scale, overflow)
        self.step_times: list[float] = []
        self.peak_memory_mb = 0.0
        self.skipped_steps = 0
        self.nan_steps = 0
        self.layer_absmax: dict[str, tuple[float, float]] = {}  # name -> (activation, output gradient)
        # what the trainer runs with, set in `setup`
        self._n = 1
        self._plugin: MasterWeightPrecision | None = None
        self._amp = False
        self._scaler: Any = None  # torch's GradScaler under Lightning's 16-mixed; None for bf16-mixed
        self._low: torch.dtype | None = None
        self._device = torch.device("cpu")
        self._cuda = False
        self._layer_stats = layer_stats
        self._ranges = LayerRanges()
        # per step
        self._step: _Step | None = None
        self._rows: list[_Row] = []
        self._warned: tuple[str, ...] = ()

    @staticmethod
    def of(trainer: pl.Trainer) -> "PrecisionMonitor | None":
        """The trainer's PrecisionMonitor, if it has one."""
        return next((c for c in trainer.callbacks if isinstance(c, PrecisionMonitor)), None)

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._n = self.every_n_steps or max(trainer.log_every_n_steps, 1)
        plugin = trainer.precision_plugin
        self._plugin = plugin if isinstance(plugin, MasterWeightPrecision) else None
        self._amp = isinstance(plugin, MixedPrecision)  # Lightning's AMP: 16-mixed / bf16-mixed
        self._scaler = plugin.scaler if self._amp else None
        self._device = trainer.strategy.root_device
        self._cuda = self._device.type == "cuda"
        self._ranges = LayerRanges()  # layers found anew for this module
        self._layer_stats = self.layer_stats
        if self.layer_stats and pl_module.hparams.get("compile"):
            # hooks added and removed every n steps would make torch.compile retrace the net each time, until it
            # gives up and runs it uncompiled (seen on CPU: recompile_limit hit in the first epoch)
            self._layer_stats = False
            rank_zero_warn("PrecisionMonitor: per-layer stats are off while the net is compiled (model.compile)")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the plugin resolves dtype="auto" when it converts the module, after the callbacks' setup
        self._low = self._plugin.dtype if self._plugin is not None else LOW_DTYPE_OF.get(str(trainer.precision))

    # ------------------------------------------------------------------ per step
    # A cheap step launches a handful of tiny device ops (two multi-tensor norms and their reductions) and keeps
    # references; whatever needs a comparison or a running count (NaN loss, AMP overflow, headroom) is worked
    # out on the host when the buffered rows are written, after their one transfer.
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        # Lightning logs this batch's train/loss at the step count before its optimizer step
        step = trainer.global_step
        if self._step is not None and self._step.step == step:  # gradient accumulation: one more micro-batch
            self._step.voxels += _voxels(batch)
            return
        if self._cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            start = time.perf_counter()
        self._step = _Step(step=step, voxels=_voxels(batch), costly=(step + 1) % self._n == 0, start=start)
        if self._step.costly and self._layer_stats:
            self._ranges.attach(pl_module)

    def _scale_used(self) -> float | Tensor | None:
        """The scale this step's backward ran with (the scalers update only after the optimizer step)."""
        if self._plugin is not None:
            return self._plugin.scaler.scale
        if self._scaler is not None and self._scaler._scale is not None:
            return self._scaler._scale.detach().clone()
        return None

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer):
        # Lightning's AMP plugin and ours call this once the gradients are unscaled and before deciding to skip:
        # these are the FP32 gradients the optimizer will apply (on_train_batch_end drops them for our skips).
        params = list(trainer.precision_plugin.main_params(optimizer))  # a generator in Lightning's base class
        grads = [p.grad for p in params if p.grad is not None]
        step = self._step
        if not grads or step is None:
            return
        step.scale_used = scale = self._scale_used()
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        step.norms.append(torch.linalg.vector_norm(torch.stack(norms)))
        if not step.costly or self._low is None:
            return
        step.amaxes.append(torch.stack(torch._foreach_norm(grads, math.inf, dtype=torch.float32)).max())
        low_grads, masters = self._low_grads_and_masters(params, optimizer)
        if low_grads:
            # one flat copy: a few large ops instead of several small ones per parameter
            flat = torch.cat([g.reshape(-1) for g in low_grads]).float()
            tiny = torch.finfo(self._low).tiny  # the smallest normal number: below it, subnormal or zero
            zeros = torch.count_nonzero((flat * (1.0 if scale is None else scale)).to(self._low).abs() < tiny)
            step.zero_counts.append((zeros, flat.numel()))
        if masters:
            step.masters.append((masters, torch.cat([m.detach().reshape(-1) for m in masters])))

    def _low_grads_and_masters(self, params: list[Tensor], optimizer: Optimizer) -> tuple[list[Tensor], list[Tensor]]:
        """Gradients that were (or, under AMP, would be) low precision, and the FP32 weights with masters."""
        if self._plugin is not None:
            model_params, master_params = self._plugin.param_pairs(optimizer)
            masters = [m for p, m in zip(model_params, master_params, strict=True) if p is not m]
            return [m.grad for m in masters if m.grad is not None], masters
        with_grad = [p for p in params if p.grad is not None]
        # AMP keeps FP32 weights, which play the masters' part; *-true weights are low and have none
        return [p.grad for p in with_grad], (with_grad if self._amp else [])

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ):
        step = self._step
        if step is None or trainer.global_step == step.step:
            return  # accumulating: no optimizer step yet
        self._step = None
        row = _Row(step=step.step, voxels=step.voxels)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor):
            row.loss = loss.detach()
        last = self._plugin.last_step if self._plugin is not None else {}
        if last.get("overflow"):
            # inf/NaN gradients that were never applied: no norm, amax, underflow or lost-update figures
            step.norms, step.amaxes, step.zero_counts, step.masters = [], [], [], []
        if last:
            # host numbers already: the plugin syncs once per step to decide whether to skip
            row.metrics.update(
                loss_scale=last["loss_scale"], overflow=last["overflow"], skipped_steps=last["skipped_steps"]
            )
        elif isinstance(step.scale_used, Tensor):
            # GradScaler keeps its scale on the device; it goes down only after a step with inf/NaN gradients
            row.metrics["loss_scale"], row.scale_used = self._scaler._scale.detach().clone(), step.scale_used
        if step.norms:
            norms = step.norms
            row.metrics["grad_norm"] = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
        if step.amaxes:
            row.amax = step.amaxes[0] if len(step.amaxes) == 1 else torch.stack(step.amaxes).max()
            row.amax_scale = 1.0 if step.scale_used is None else step.scale_used
        if step.zero_counts:
            zeros, total = zip(*step.zero_counts, strict=True)
            row.metrics["grad_zero_frac"] = sum(zeros) / max(sum(total), 1)
        if step.masters:
            row.metrics["update_lost_frac"] = self._update_lost_frac(step.masters)
        row.layers = self._ranges.detach()
        if self._cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            row.events = (step.start, end)
            row.metrics["peak_memory_mb"] = torch.cuda.max_memory_allocated(self._device) / 2**20
        else:
            row.metrics["step_time"] = time.perf_counter() - step.start
            # ru_maxrss is in KiB on Linux
            row.metrics["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self._rows.append(row)
        if step.costly:
            self._write(trainer)

    def _update_lost_frac(self, pairs: list[tuple[list[Tensor], Tensor]]) -> Tensor:
        lost, changed = [], []
        for masters, before in pairs:
            delta = torch.cat([m.detach().reshape(-1) for m in masters]) - before
            low_before = before.to(self._low)
            moved = delta != 0
            unchanged = (low_before.float() + delta).to(self._low) == low_before
            changed.append(moved.sum())
            lost.append((moved & unchanged).sum())
        # a skipped step moves nothing: 0/0 is NaN, dropped at write-out
        return sum(lost) / sum(changed)

    # ------------------------------------------------------------------ write-out
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
            scaled = row.amax * row.amax_scale
            metrics["fp16_headroom_bits"] = math.log2(FP16_MAX / scaled) if scaled > 0 else math.inf
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
        if wandb_loggers(trainer):
            import wandb

            def log2(values: list[float]) -> np.ndarray:
                finite = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
                return np.log2(np.maximum(finite, 2.0**-40))

            data = {"precision/layers/act_absmax_log2": wandb.Histogram(log2(act))}
            if any(math.isfinite(g) for g in grad):
                data["precision/layers/act_grad_absmax_log2"] = wandb.Histogram(log2(grad))
            for logger in wandb_loggers(trainer):
                log_to_wandb(logger, data, step)

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
        if not closest or math.log2(FP16_MAX / closest[0][0]) >= self.warn_headroom_bits:
            return
        if tuple(n for _, n in closest) == self._warned:
            return  # the same layers again: said already
        self._warned = tuple(n for _, n in closest)
        listed = ", ".join(
            f"{n} {v:.4g} ({math.log2(FP16_MAX / v):.1f} bits below)" if math.isfinite(v) else f"{n} inf (overflowed)"
            for v, n in closest
        )
        rank_zero_warn(f"PrecisionMonitor, step {step}: activations closest to the FP16 maximum {FP16_MAX:g}: {listed}")

    # ------------------------------------------------------------------ end, errors, checkpoints
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._ranges.detach()
        try:
            self._write(trainer)  # the steps that led to a crash (e.g. the plugin's NaN stop) are the telling ones
        except Exception:  # noqa: BLE001 - never mask the exception that ended training
            pass

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

    def state_dict(self) -> dict[str, int]:
        return {"nan_steps": self.nan_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.nan_steps = int(state_dict.get("nan_steps", 0))
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
