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
step; the costly ones are computed on those steps only (the write-out: ``medseg.precision.monitor_writeout``).
Per-layer abs-maxes go to listeners (W&B histograms: ``medseg.tracking.layer_histograms``), and a warning names
the layers whose activations come closest to the FP16 maximum. Its cost is per tensor and layer, not per voxel
(except for the sampled steps' abs-maxes), so larger models pay relatively less.
"""

import math
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from medseg.precision.dtypes import lightning_low_dtype, lost_update_counts
from medseg.precision.layer_ranges import LayerRanges, first_tensor
from medseg.precision.monitor_writeout import LayerListener, WriteOut, _Row
from medseg.precision.view import MasterWeightView, master_weights


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


def _voxels(batch: Any) -> int:
    """Voxels in the batch's image: batch x spatial size, channels not counted."""
    image = batch.get("image") if isinstance(batch, dict) else first_tensor(batch)
    if not isinstance(image, Tensor) or image.ndim < 3:
        return 0
    return image.numel() // image.shape[1]


class PrecisionMonitor(WriteOut, pl.Callback):
    """Logs loss scaling, gradient health, lost updates, per-layer ranges and speed under ``precision/``.

    Works for medseg's ``MasterWeightPrecision`` plugin (found by ``medseg.precision.view.master_weights``),
    Lightning's AMP (``16-mixed``, ``bf16-mixed``), ``16-true``/``bf16-true`` and FP32; a metric that does not
    apply to the precision is not logged at all. See the module docstring for the keys.

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
        self.layer_step: int | None = None  # the sampled step layer_absmax is from
        # called after each sampled step with its layer_absmax (medseg.tracking.layer_histograms registers one)
        self.layer_listeners: list[LayerListener] = []
        # what the trainer runs with, set in `setup`
        self._n = 1
        self._plugin: MasterWeightView | None = None
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
        self._plugin = master_weights(trainer)
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
        self._low = self._plugin.dtype if self._plugin is not None else lightning_low_dtype(str(trainer.precision))

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
            # the plugin copies its masters once a step, for this and for the advisor's lost-update sampling
            if self._plugin is not None:
                before = self._plugin.masters_before_step(optimizer)
            else:
                before = torch.cat([m.detach().reshape(-1) for m in masters])
            step.masters.append((masters, before))

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
            n_moved, n_lost = lost_update_counts(
                before, torch.cat([m.detach().reshape(-1) for m in masters]), self._low
            )
            changed.append(n_moved)
            lost.append(n_lost)
        # a skipped step moves nothing: 0/0 is NaN, dropped at write-out
        return sum(lost) / sum(changed)

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

    def state_dict(self) -> dict[str, int]:
        return {"nan_steps": self.nan_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.nan_steps = int(state_dict.get("nan_steps", 0))
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
