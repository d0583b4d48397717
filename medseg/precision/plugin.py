"""Lightning precision plugin: FP16/BF16 weights and activations, FP32 master weights, dynamic loss scaling.

Unlike Lightning's ``"16-true"``/``"bf16-true"`` (no masters: updates smaller than half an ulp of the weight
are lost) and ``"16-mixed"`` (autocast: FP32 weights, casts on every op), the model itself is held in the low
dtype and the optimizer steps FP32 copies of its weights, the Apex-O2 / Megatron recipe.

Lightning's hook order, which the design follows (``Strategy.setup`` then ``_run``):
``convert_module`` -> ``configure_optimizers`` (optimizer built on the low-precision params) -> ``connect``
(masters made here, optimizer re-pointed to them) -> on resume: ``load_state_dict`` (plugin state) -> loops ->
optimizer ``load_state_dict`` (lands on the masters, since they are what ``param_groups`` holds).
"""

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_utilities import apply_to_collection
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from medseg.precision.advisor import PrecisionAdvisor
from medseg.precision.convert import cast_floating, to_low_precision
from medseg.precision.dtypes import DTYPES, auto_low_dtype
from medseg.precision.masters import (
    Masters,
    copy_to_model,
    grads_to_masters,
    nonfinite_modules,
    point_at_masters,
    release_grads,
    skips_on_device,
)
from medseg.precision.plugin_state import CheckpointState
from medseg.precision.precision_plan import PrecisionPlan, load_plan, plan_file
from medseg.precision.scaler import DynamicLossScaler

log = logging.getLogger(__name__)


def _lightning_module(model: nn.Module) -> "pl.LightningModule | None":
    return next((m for m in model.modules() if isinstance(m, pl.LightningModule)), None)  # DDP: inside the wrapper


class MasterWeightPrecision(CheckpointState, Precision):
    """FP16/BF16 model with FP32 master weights and loss scaling, for automatic optimization.

    Norm layers (BatchNorm, InstanceNorm, GroupNorm, LayerNorm) keep FP32 weights and running statistics.
    BatchNorm/InstanceNorm take the low-precision input straight into kernels that accumulate in FP32 and return
    the low dtype (``norms_in_float32=True`` casts their input to FP32 and the output back, as GroupNorm and
    LayerNorm always do). Loss modules compute in FP32 and return FP32; everything else runs in the low dtype.
    ``trainer.precision`` reads ``"16-true"``/``"bf16-true"``, the dtype the model's weights are held in; code
    outside ``medseg.precision`` reads this plugin through ``medseg.precision.view.master_weights(trainer)``.
    Adam, AdamW and SGD built without ``foreach``/``fused`` step the masters with torch's fused kernel
    (``fused=True`` in their param groups and checkpoints).

    After each optimizer step ``last_step`` holds ``{"loss_scale": float (the scale for the next step),
    "overflow": 0 | 1, "skipped_steps": int}`` plus, with ``track_grad_norm``, ``"grad_norm"``: the unscaled
    FP32 gradient norm before clipping, a 0-dim tensor left on the device (convert it only when logging).

    Args:
        dtype: ``"float16"``, ``"bfloat16"`` or ``"auto"`` (float16 on CUDA, bfloat16 otherwise; resolved in
            ``convert_module`` once the trainer's device is known).
        scaler: loss scaler for float16; ``None`` gives ``DynamicLossScaler()``. BFloat16 has FP32's range and
            needs no scaling, so it gets a static scale of 1 whatever is passed, unless ``scale_bfloat16``.
        scale_bfloat16: use ``scaler`` for bfloat16 too.
        max_consecutive_skips: raise once this many steps in a row had inf/NaN gradients (also raised when the
            scale is already at ``min_scale`` and still overflows): training must not go on with NaN.
        track_grad_norm: compute ``last_step["grad_norm"]`` (one extra read of the gradients per step).
        norms_in_float32: run BatchNorm/InstanceNorm on FP32 copies of their input (slower, more memory; for
            norm layers from elsewhere whose kernels would accumulate in the low dtype).
        fp32_modules: module-name globs (``net.vit.blocks.*.attn``, names as in the LightningModule) or class
            names (``SABlock``) kept wholly in FP32: FP32 weights (their own masters) and an FP32 forward, with
            inputs cast to FP32 and outputs back to the low dtype. A pattern matching no module is an error.
        precision_plan: a ``precision_plan.yaml`` (written by an earlier run) whose ``fp32_modules`` are added to
            these. ``plan``: its old name, accepted with a deprecation warning for one release.
        advisor: finds the module where an overflow started and keeps it in FP32 once it has caused enough
            of them (``medseg.precision.advisor``); the plan, with its decisions, is saved in checkpoints and as
            ``precision_plan.yaml`` in ``trainer.default_root_dir``.
        fp32_attention: in FP16, run the attention logits and softmax of MONAI's ``SABlock`` (UNETR) and
            ``WindowAttention`` (SwinUNETR) in FP32, their weights staying FP16 (``medseg.precision.attention``).
    """

    precision = "32-true"  # set to "16-true" / "bf16-true" once the dtype is known

    def __init__(
        self,
        dtype: Literal["auto", "float16", "bfloat16"] = "auto",
        scaler: DynamicLossScaler | None = None,
        max_consecutive_skips: int = 50,
        track_grad_norm: bool = False,
        scale_bfloat16: bool = False,
        norms_in_float32: bool = False,
        fp32_modules: Sequence[str] = (),
        precision_plan: str | None = None,
        advisor: PrecisionAdvisor | None = None,
        fp32_attention: bool = True,
        plan: str | None = None,
    ) -> None:
        if dtype != "auto" and dtype not in ("float16", "bfloat16"):
            raise ValueError(f"dtype must be 'auto', 'float16' or 'bfloat16', got {dtype!r}")
        if max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips must be >= 1, got {max_consecutive_skips}")
        self.dtype_name, self.scaler, self.max_consecutive_skips = dtype, scaler, max_consecutive_skips
        self.track_grad_norm, self.scale_bfloat16, self.norms_in_float32 = (
            track_grad_norm,
            scale_bfloat16,
            norms_in_float32,
        )
        self.precision_plan = PrecisionPlan(fp32_modules=list(fp32_modules))
        if (path := plan_file(precision_plan, plan)) is not None:
            self.precision_plan.fp32_modules += load_plan(path).fp32_modules
        self.advisor, self.fp32_attention = advisor, fp32_attention
        self._plan_dir: Path | None = None  # where precision_plan.yaml goes: the trainer's default_root_dir
        self._module: pl.LightningModule | None = None  # set in connect(): promotions apply to it
        self.last_step: dict[str, Any] = {}
        self._dtype: torch.dtype | None = None
        self._masters: list[tuple[Optimizer, Masters]] = []
        self._pending_state: dict[str, Any] | None = None  # plugin state loaded before connect() made masters
        if dtype != "auto":
            self._set_dtype(dtype)

    @property
    def dtype(self) -> torch.dtype | None:
        """The low dtype (``torch.float16``/``torch.bfloat16``), ``None`` while ``"auto"`` is unresolved."""
        return self._dtype

    def _set_dtype(self, name: str) -> None:
        self.dtype_name = name
        self._dtype = DTYPES[name]
        self.precision = "16-true" if name == "float16" else "bf16-true"
        if name == "bfloat16" and not self.scale_bfloat16:
            # one config serves both dtypes (`dtype: auto`), so a configured scaler is set aside here
            self.scaler = DynamicLossScaler(init_scale=1.0, dynamic=False)
        elif self.scaler is None:
            self.scaler = DynamicLossScaler()

    def _resolve_dtype(self, module: nn.Module) -> None:
        if self._dtype is not None:
            return
        # strategies convert the module before moving it to the device, so ask the trainer where it will run
        lightning_module = _lightning_module(module)
        if lightning_module is not None and lightning_module._trainer is not None:
            device_type = lightning_module._trainer.strategy.root_device.type
        else:
            param = next(module.parameters(), None)
            cuda = torch.cuda.is_available() if param is None else param.device.type == "cuda"
            device_type = "cuda" if cuda else "cpu"
        self._set_dtype(str(auto_low_dtype(device_type)).removeprefix("torch."))
        log.info("MasterWeightPrecision: dtype='auto' resolved to %s on %r", self.dtype_name, device_type)

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        """Cast ``module`` to the low dtype in place; norm layers and losses keep FP32 weights (see the class).

        In place because ``DDPStrategy.setup`` ignores the return value.
        """
        self._resolve_dtype(module)
        assert self._dtype is not None
        names = self.check_plan(module)
        to_low_precision(
            module, self._dtype, self.norms_in_float32, fp32_modules=names, fp32_attention=self.fp32_attention
        )
        return module

    @override
    def convert_input(self, data: Any) -> Any:
        """Cast the floating tensors of a batch to the low dtype; integer tensors (labels) are left alone."""
        if self._dtype is None:
            return data
        return apply_to_collection(data, Tensor, cast_floating, self._dtype)

    @override
    def connect(
        self, model: nn.Module, optimizers: list[Optimizer], lr_schedulers: list[Any]
    ) -> tuple[nn.Module, list[Optimizer], list[Any]]:
        """Make an FP32 master for each low-precision parameter and point the optimizers at the masters."""
        lightning_module = _lightning_module(model)
        if lightning_module is not None and not lightning_module.automatic_optimization:
            raise MisconfigurationException(
                "MasterWeightPrecision supports automatic optimization only; this LightningModule sets"
                " `automatic_optimization = False`. Use Lightning's precision='16-mixed' or 'bf16-mixed'."
            )
        self._resolve_dtype(model)
        self._module = lightning_module
        names = {p: n for n, p in (lightning_module or model).named_parameters()}
        masters_of: dict[Tensor, Tensor] = {}  # a parameter shared by two optimizers gets one master
        # `trainer.test()` after `fit()` connects the same optimizers again; they already hold the masters
        connected = dict(self._masters)
        self._masters = []
        for optimizer in optimizers:
            if optimizer in connected:
                self._masters.append((optimizer, connected[optimizer]))
                continue
            if isinstance(optimizer, torch.optim.LBFGS):
                raise MisconfigurationException("MasterWeightPrecision and the LBFGS optimizer are not compatible.")
            entry = point_at_masters(optimizer, masters_of, names)
            self._masters.append((optimizer, entry))
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.load_state_dict(state)
        if lightning_module is not None and lightning_module._trainer is not None:
            self._plan_dir = Path(lightning_module.trainer.default_root_dir)
            if self.precision_plan.fp32_modules:  # an empty plan is not written: runs without a run dir stay clean
                self._save_plan()
        return model, optimizers, lr_schedulers

    def _entry(self, optimizer: Optimizer) -> Masters:
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # unwrap a LightningOptimizer
        for opt, entry in self._masters:
            if opt is optimizer:
                return entry
        raise RuntimeError("MasterWeightPrecision: `connect()` never saw this optimizer; it has no FP32 masters.")

    def param_pairs(self, optimizer: Optimizer) -> tuple[list[Tensor], list[Tensor]]:
        """``(model_params, master_params)`` of ``optimizer``, aligned; norm params are their own masters."""
        entry = self._entry(optimizer)
        return entry.model_params, entry.master_params

    def masters_before_step(self, optimizer: Optimizer) -> Tensor:
        """The FP32 masters of ``optimizer``'s low-precision parameters as they were before this step's update,
        flattened in ``param_pairs`` order; call it between backward and the update (``on_before_optimizer_step``).
        Copied once per step, for ``PrecisionMonitor`` and the advisor's lost-update sampling alike."""
        return self._entry(optimizer).snapshot()

    @property
    def master_params(self) -> list[Tensor]:
        """The FP32 masters of every optimizer, in ``param_groups`` order."""
        return [p for _, entry in self._masters for p in entry.master_params]

    @override
    def main_params(self, optimizer: Optimizer) -> list[Tensor]:
        """The FP32 masters: gradient clipping sees unscaled FP32 gradients."""
        return self._entry(optimizer).master_params

    @override
    def pre_backward(self, tensor: Tensor, module: "pl.LightningModule") -> Tensor:  # type: ignore[override]
        assert self.scaler is not None
        if self.scaler.scale != 1.0:
            tensor = tensor * self.scaler.scale
        return super().pre_backward(tensor, module)

    @override
    def optimizer_step(  # type: ignore[override]
        self,
        optimizer: Optimizer,
        model: "pl.LightningModule",
        closure: Callable[[], Any],
        **kwargs: Any,
    ) -> Any:
        """Backward (in the closure), unscale into the FP32 masters, clip, step unless inf/NaN, copy back.

        As in Lightning's AMP plugin, ``on_before_optimizer_step`` hooks and clipping run before the skip
        decision, on every step. With a fused Adam/AdamW the step and the copy back are queued before the one
        host sync too (the kernel skips itself on inf/NaN), so the GPU never idles while the host launches them.
        """
        assert self.scaler is not None
        closure_result = closure()
        if closure_result is None:
            # `training_step` returned None: nothing to step (as in Lightning's AMP plugin); drop gradients
            # that earlier accumulation batches left, since Lightning's zero_grad only reaches the masters
            for p in self._entry(optimizer).low_model:
                p.grad = None
            return None

        entry = self._entry(optimizer)
        entry.before_step = None  # a snapshot is of this step's masters only
        grads = grads_to_masters(entry)
        found_inf: Tensor | None = None
        grad_norm: Tensor | None = None
        if grads:
            found_inf = torch.zeros((), device=grads[0].device)  # 0-dim, as GradScaler: fused Adam needs it
            inv_scale = self.scaler.inv_scale_tensor(found_inf.device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
            if dist.is_available() and dist.is_initialized():
                # every rank must take the same decision, or the replicas drift apart
                dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
            if self.track_grad_norm:
                grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))

        self._after_closure(model, optimizer)  # on_before_optimizer_step hooks, then clipping of main_params
        before = entry.snapshot() if self._samples_lost_updates(entry, model) else None
        torch_optimizer = getattr(optimizer, "_optimizer", optimizer)
        queued = found_inf is not None and skips_on_device(torch_optimizer)
        if queued:
            torch_optimizer.found_inf = found_inf  # type: ignore[attr-defined]
            try:
                optimizer.step(**kwargs)
            finally:
                del torch_optimizer.found_inf  # type: ignore[attr-defined]
            copy_to_model(entry)  # after a skipped step the masters are unchanged: a no-op copy
        overflow = found_inf is not None and bool(found_inf.item())  # the step's one host sync

        if overflow:
            nonfinite = nonfinite_modules(entry) if self.advisor is not None else []
            optimizer.zero_grad(set_to_none=True)  # master grads; the model's were released above
            scale = self.scaler.scale
            if self.advisor is not None:
                self._advise(optimizer, model, closure, nonfinite)
            entry.before_step = None
            self.scaler.update(True)
            self._record(overflow=True, grad_norm=None)
            self._check_skips(model, scale)
            # Lightning still steps the LR schedulers after a skipped step, as with its AMP plugin
            return None

        if not queued:
            optimizer.step(**kwargs)
            copy_to_model(entry)
        self.scaler.update(False)
        self._record(overflow=False, grad_norm=grad_norm)
        if before is not None:
            self._report_lost_updates(entry, before, model)
        entry.before_step = None
        return closure_result

    def _record(self, overflow: bool, grad_norm: Tensor | None) -> None:
        assert self.scaler is not None
        self.last_step = {
            "loss_scale": self.scaler.scale,
            "overflow": int(overflow),
            "skipped_steps": self.scaler.skipped_steps,
        }
        if grad_norm is not None:
            self.last_step["grad_norm"] = grad_norm

    def _check_skips(self, model: "pl.LightningModule", scale: float) -> None:
        assert self.scaler is not None
        reason = self.scaler.stuck(scale, self.max_consecutive_skips)
        if reason is not None:
            step = model.trainer.global_step if model._trainer is not None else self.scaler.steps - 1
            raise RuntimeError(
                f"MasterWeightPrecision: inf/NaN gradients at global step {step}: {reason}. Training would only go"
                " on with NaN; check the data and the loss (compute it in float32), or lower the learning rate."
            )

    @override
    def teardown(self) -> None:
        # the FP32 gradient buffers are only needed during steps; masters stay for save_checkpoint after fit
        for _, entry in self._masters:
            release_grads(entry)
        # state loaded by a run without optimizers (validate/test) must not land on the masters of a later fit
        self._pending_state = None
