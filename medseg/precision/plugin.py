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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning_utilities import apply_to_collection
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

from medseg.precision.advisor import PrecisionAdvisor, locate, overflow_line
from medseg.precision.convert import LOSS_TYPES, cast_floating, keep_fp32, to_low_precision
from medseg.precision.plan import PLAN_FILE, Decision, PlanError, PrecisionPlan, load_plan, match_modules, save_plan
from medseg.precision.scaler import DynamicLossScaler

log = logging.getLogger(__name__)

LOW_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# Optimizers with a `fused=True` kernel on both CPU and CUDA. The step on the masters comes right after the
# plugin's one host sync, with no GPU work queued behind it, so its launch overhead is GPU idle time: the fused
# kernel takes one launch for all masters instead of a dozen multi-tensor ones (measured on an H200, UNet 128^3:
# 2.6 -> 1.4 ms per step outside forward/backward); on CPU it replaces a Python loop over the parameters.
FUSED_OPTIMIZERS: tuple[type[Optimizer], ...] = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)
# Fused kernels that skip the whole update on the device when `optimizer.found_inf` is nonzero (the hook torch
# gives GradScaler) and undo their step count. Not SGD: on a skipped first step its fused path leaves the momentum
# buffers it allocated with `empty_like` uninitialised.
DEVICE_SKIP_OPTIMIZERS: tuple[type[Optimizer], ...] = (torch.optim.Adam, torch.optim.AdamW)
# Lightning saves a precision plugin's state under its class name; this plugin was called MixedPrecision, like
# Lightning's AMP plugin, until it was renamed, so older checkpoints hold its state under that key.
LEGACY_STATE_KEY = "MixedPrecision"


def saved_state(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """This plugin's state in a checkpoint (under its name, or the legacy key when that entry has masters)."""
    state = checkpoint.get(MasterWeightPrecision.__qualname__) or checkpoint.get(LEGACY_STATE_KEY) or {}
    return state if "masters" in state else None


def _prefer_fused(optimizer: Optimizer) -> None:
    """Switch the param groups that left the implementation to torch (``foreach`` and ``fused`` both None) to the
    fused kernel, when every parameter is an FP32 tensor on CPU or CUDA (which the masters are)."""
    if type(optimizer) not in FUSED_OPTIMIZERS:  # exact type: a subclass may override `step`
        return
    for group in optimizer.param_groups:
        chosen = group.get("fused") is not None or group.get("foreach") is not None or group.get("differentiable")
        supported = all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in group["params"])
        if not chosen and supported:
            group["fused"] = True


def _skips_on_device(optimizer: Optimizer) -> bool:
    return type(optimizer) in DEVICE_SKIP_OPTIMIZERS and all(g.get("fused") for g in optimizer.param_groups)


def _lightning_module(model: nn.Module) -> "pl.LightningModule | None":
    # under DDP `connect` gets the DistributedDataParallel wrapper
    return next((m for m in model.modules() if isinstance(m, pl.LightningModule)), None)


@dataclass
class _Masters:
    """One optimizer's parameters, in ``param_groups`` order.

    ``model_params[i]`` is the model's tensor (low precision, or FP32 for norm layers) and
    ``master_params[i]`` its FP32 master (the same object where the model's tensor is already FP32).
    ``low_model``/``low_master`` are the pairs that differ, aligned, for the multi-tensor copies.
    """

    names: list[str]
    model_params: list[Tensor]
    master_params: list[Tensor]
    low_model: list[Tensor]
    low_master: list[Tensor]
    fp32_params: list[Tensor]
    # FP32 gradients of low_master, allocated on the first step and reused: zero_grad only drops the reference
    grad_buffers: list[Tensor] | None = None


class MasterWeightPrecision(Precision):
    """FP16/BF16 model with FP32 master weights and loss scaling, for automatic optimization.

    Norm layers (BatchNorm, InstanceNorm, GroupNorm, LayerNorm) keep FP32 weights and running statistics.
    BatchNorm/InstanceNorm take the low-precision input straight into kernels that accumulate in FP32 and return
    the low dtype (``norms_in_float32=True`` casts their input to FP32 and the output back, as GroupNorm and
    LayerNorm always do). Loss modules compute in FP32 and return FP32; everything else runs in the low dtype.
    ``trainer.precision`` reads ``"16-true"``/``"bf16-true"``, the dtype the model's weights are held in; tell
    this plugin apart from Lightning's with ``isinstance``. Adam, AdamW and SGD built without ``foreach``/``fused``
    step the masters with torch's fused kernel (``fused=True`` in their param groups and checkpoints).

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
        plan: a ``precision_plan.yaml`` (written by an earlier run) whose ``fp32_modules`` are added to these.
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
        plan: str | None = None,
        advisor: PrecisionAdvisor | None = None,
        fp32_attention: bool = True,
    ) -> None:
        if dtype != "auto" and dtype not in LOW_DTYPES:
            raise ValueError(f"dtype must be 'auto', 'float16' or 'bfloat16', got {dtype!r}")
        if max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips must be >= 1, got {max_consecutive_skips}")
        self.dtype_name = dtype
        self.scaler = scaler
        self.max_consecutive_skips = max_consecutive_skips
        self.track_grad_norm = track_grad_norm
        self.scale_bfloat16 = scale_bfloat16
        self.norms_in_float32 = norms_in_float32
        self.plan = PrecisionPlan(fp32_modules=list(fp32_modules))
        if plan is not None:
            self.plan.fp32_modules += load_plan(plan).fp32_modules
        self.advisor = advisor
        self.fp32_attention = fp32_attention
        self._plan_dir: Path | None = None  # where precision_plan.yaml goes: the trainer's default_root_dir
        self._module: pl.LightningModule | None = None  # set in connect(): promotions apply to it
        self.last_step: dict[str, Any] = {}
        self._dtype: torch.dtype | None = None
        self._masters: list[tuple[Optimizer, _Masters]] = []
        self._pending_state: dict[str, Any] | None = None  # plugin state loaded before connect() made masters
        if dtype != "auto":
            self._set_dtype(dtype)

    @property
    def dtype(self) -> torch.dtype | None:
        """The low dtype (``torch.float16``/``torch.bfloat16``), ``None`` while ``"auto"`` is unresolved."""
        return self._dtype

    def _set_dtype(self, name: str) -> None:
        self.dtype_name = name
        self._dtype = LOW_DTYPES[name]
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
        self._set_dtype("float16" if device_type == "cuda" else "bfloat16")
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

    def check_plan(self, module: nn.Module) -> list[str]:
        """The names of ``module``'s submodules the plan keeps in FP32; a ``PlanError`` naming the patterns that
        match none of them, or a loss."""
        names = match_modules(module, self.plan.fp32_modules, "precision.plugin.fp32_modules")
        if any(isinstance(module.get_submodule(n), LOSS_TYPES) for n in names):
            raise PlanError(f"precision.plugin.fp32_modules: {names} include a loss; losses compute in FP32 anyway")
        return names

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
            model_params: list[Tensor] = []
            master_params: list[Tensor] = []
            for group in optimizer.param_groups:
                group_masters = []
                for p in group["params"]:
                    if p not in masters_of:
                        masters_of[p] = self._make_master(p)
                    group_masters.append(masters_of[p])
                model_params.extend(group["params"])
                master_params.extend(group_masters)
                group["params"] = group_masters
            # state of an optimizer that already stepped follows its parameters, in FP32 like them
            for p, m in zip(model_params, master_params, strict=True):
                if p is not m and p in optimizer.state:
                    state = optimizer.state.pop(p)
                    optimizer.state[m] = apply_to_collection(state, Tensor, cast_floating, torch.float32)
            low = [(p, m) for p, m in zip(model_params, master_params, strict=True) if p is not m]
            entry = _Masters(
                names=[names.get(p, "") for p in model_params],
                model_params=model_params,
                master_params=master_params,
                low_model=[p for p, _ in low],
                low_master=[m for _, m in low],
                fp32_params=[p for p, m in zip(model_params, master_params, strict=True) if p is m],
            )
            _prefer_fused(optimizer)
            self._masters.append((optimizer, entry))
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.load_state_dict(state)
        if lightning_module is not None and lightning_module._trainer is not None:
            self._plan_dir = Path(lightning_module.trainer.default_root_dir)
            if self.plan.fp32_modules:  # an empty plan is not written: runs without a run dir stay clean
                self._save_plan()
        return model, optimizers, lr_schedulers

    @rank_zero_only
    def _save_plan(self) -> None:
        if self._plan_dir is not None:
            save_plan(self.plan, self._plan_dir / PLAN_FILE)

    def promote(self, module: "pl.LightningModule", names: Sequence[str]) -> None:
        """Keep the named modules of ``module`` in FP32 from now on (``keep_fp32``), their weights set to their FP32
        masters bit for bit; the masters and the optimizer state are not touched. Under DDP the model is wrapped
        again, since DDP's gradient buckets are made for the dtypes the parameters had."""
        assert self._dtype is not None
        for name in names:
            keep_fp32(module.get_submodule(name), self._dtype)
        for _, entry in self._masters:
            self._copy_to_model(entry)  # same FP32 master, now copied exactly; its pairing stays as it was
        strategy = module.trainer.strategy if module._trainer is not None else None
        if strategy is not None and isinstance(strategy.model, DistributedDataParallel):
            # Lightning's own wrapping (private; the public path is only taken once, at setup)
            strategy.model = strategy._setup_model(strategy.model.module)  # type: ignore[attr-defined]

    def _advise(
        self, optimizer: Optimizer, model: "pl.LightningModule", closure: Callable[[], Any], nonfinite: list[str]
    ) -> None:
        """On an overflow step: re-run the batch with the advisor's hooks, count its culprit, promote it when the
        rule says so. The re-run's gradients are dropped; the step stays skipped. ``nonfinite``: the modules whose
        gradients in the step itself held inf/NaN, named when the re-run does not overflow."""
        assert self.advisor is not None and self.scaler is not None
        step, scale = model.trainer.global_step, self.scaler.scale
        culprit = locate(closure, model)
        for _, entry in self._masters:
            for p in entry.low_model:
                p.grad = None
        optimizer.zero_grad(set_to_none=True)
        rank_zero_only(log.info)(overflow_line(culprit, step, scale, nonfinite))
        decision = self.advisor.record(culprit, step, scale) if culprit is not None else None
        if decision is not None:
            self._decide(model, decision)

    def observe_headroom(
        self, model: "pl.LightningModule", step: int, acts: dict[str, float], out_grads: dict[str, float], scale: float
    ) -> None:
        """The advisor's headroom rule on one of ``PrecisionMonitor``'s sampled steps that did not overflow:
        ``acts``/``out_grads`` are each weighted layer's forward-output and (scaled) output-gradient abs-max.
        FP16 only: BF16 has FP32's range. Layers whose weights are already FP32 (norms, promoted) are left out."""
        rule = self.advisor.headroom if self.advisor is not None else None
        if rule is None or self._dtype != torch.float16:
            return
        skip = {n for n in acts if any(p.dtype == torch.float32 for p in model.get_submodule(n).parameters())}
        assert self.advisor is not None
        for decision in rule.observe(step, acts, out_grads, scale, self.advisor.backward_max_scale, skip):
            self._decide(model, decision)

    def _decide(self, model: "pl.LightningModule", decision: Decision) -> None:
        """Apply one of the advisor's decisions: promote the module, record it in the plan, say so, save the plan."""
        if decision.layer in self.plan.fp32_modules:
            return
        if isinstance(model.get_submodule(decision.layer), LOSS_TYPES):
            rank_zero_only(log.warning)(f"precision advisor: {decision.line()}: a loss, already FP32; not promoted")
            return
        self.promote(model, [decision.layer])
        self.plan.fp32_modules.append(decision.layer)
        self.plan.decisions.append(decision)
        rank_zero_only(log.warning)(f"precision advisor: {decision.line()}")
        self._save_plan()

    @staticmethod
    def _make_master(param: Tensor) -> Tensor:
        if param.dtype not in LOW_DTYPES.values():
            return param  # FP32 (norm layers) is its own master
        # own storage: the master must not alias the low-precision weight it is copied into after each step
        return nn.Parameter(param.detach().to(torch.float32, copy=True), requires_grad=param.requires_grad)

    def _entry(self, optimizer: Optimizer) -> _Masters:
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # unwrap a LightningOptimizer
        for opt, entry in self._masters:
            if opt is optimizer:
                return entry
        raise RuntimeError("MasterWeightPrecision: `connect()` never saw this optimizer; it has no FP32 masters.")

    def param_pairs(self, optimizer: Optimizer) -> tuple[list[Tensor], list[Tensor]]:
        """``(model_params, master_params)`` of ``optimizer``, aligned; norm params are their own masters."""
        entry = self._entry(optimizer)
        return entry.model_params, entry.master_params

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
        grads = self._grads_to_masters(entry)
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
        before = self._lost_update_sample(entry, model)
        torch_optimizer = getattr(optimizer, "_optimizer", optimizer)
        queued = found_inf is not None and _skips_on_device(torch_optimizer)
        if queued:
            torch_optimizer.found_inf = found_inf  # type: ignore[attr-defined]
            try:
                optimizer.step(**kwargs)
            finally:
                del torch_optimizer.found_inf  # type: ignore[attr-defined]
            self._copy_to_model(entry)  # after a skipped step the masters are unchanged: a no-op copy
        overflow = found_inf is not None and bool(found_inf.item())  # the step's one host sync

        if overflow:
            nonfinite = self._nonfinite_modules(entry) if self.advisor is not None else []
            optimizer.zero_grad(set_to_none=True)  # master grads; the model's were released above
            scale = self.scaler.scale
            if self.advisor is not None:
                self._advise(optimizer, model, closure, nonfinite)
            self.scaler.update(True)
            self._record(overflow=True, grad_norm=None)
            self._check_skips(model, scale)
            # Lightning still steps the LR schedulers after a skipped step, as with its AMP plugin
            return None

        if not queued:
            optimizer.step(**kwargs)
            self._copy_to_model(entry)
        self.scaler.update(False)
        self._record(overflow=False, grad_norm=grad_norm)
        if before is not None:
            self._report_lost_updates(entry, before, model)
        return closure_result

    def _lost_update_sample(self, entry: _Masters, model: "pl.LightningModule") -> list[Tensor] | None:
        """A copy of the low-precision modules' masters before the step, on the advisor's sampled steps."""
        if self.advisor is None or model._trainer is None or not entry.low_master:
            return None
        if not self.advisor.samples_lost_updates(model.trainer.global_step):
            return None
        return [m.detach().clone() for m in entry.low_master]

    def _report_lost_updates(self, entry: _Masters, before: list[Tensor], model: "pl.LightningModule") -> None:
        assert self.advisor is not None and self._dtype is not None
        names = [n for n, p, m in zip(entry.names, entry.model_params, entry.master_params, strict=True) if p is not m]
        shares = self.advisor.record_lost_updates(names, before, entry.low_master, self._dtype)
        top = sorted(shares.items(), key=lambda kv: -kv[1])[:3]
        listed = ", ".join(f"{name} {share:.1%}" for name, share in top)
        rank_zero_only(log.info)(
            f"precision advisor: step {model.trainer.global_step}: updates lost to {self.dtype_name} rounding: {listed}"
        )

    @staticmethod
    def _copy_to_model(entry: _Masters) -> None:
        if entry.low_model:
            with torch.no_grad():
                torch._foreach_copy_(entry.low_model, entry.low_master)

    @staticmethod
    def _nonfinite_modules(entry: _Masters) -> list[str]:
        """Modules, in the optimizer's parameter order, whose gradient in this step (now the masters' grads) holds
        inf/NaN. Only on overflow steps: one finiteness check per parameter, read back once."""
        named = [(n, m.grad) for n, m in zip(entry.names, entry.master_params, strict=True) if m.grad is not None]
        finite = torch.stack([torch.isfinite(g).all() for _, g in named]).tolist() if named else []
        return list(dict.fromkeys(n.rsplit(".", 1)[0] for (n, _), ok in zip(named, finite, strict=True) if not ok))

    def _grads_to_masters(self, entry: _Masters) -> list[Tensor]:
        """Move the low-precision gradients into the masters' FP32 grads; returns every master gradient."""
        if entry.grad_buffers is None:
            entry.grad_buffers = [torch.empty_like(m) for m in entry.low_master]
        with_grad = [i for i, p in enumerate(entry.low_model) if p.grad is not None]
        low_grads = [entry.grad_buffers[i] for i in with_grad]
        if with_grad:
            torch._foreach_copy_(low_grads, [entry.low_model[i].grad for i in with_grad])
        for i in with_grad:
            entry.low_master[i].grad = entry.grad_buffers[i]
            # the FP32 copy is all the step needs; releasing the low one now lowers peak memory
            entry.low_model[i].grad = None
        return low_grads + [p.grad for p in entry.fp32_params if p.grad is not None]

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
        at_floor = self.scaler.dynamic and scale <= self.scaler.min_scale
        if self.scaler.consecutive_skips < self.max_consecutive_skips and not at_floor:
            return
        step = model.trainer.global_step if model._trainer is not None else self.scaler.steps - 1
        reason = (
            f"the loss scale is at min_scale={self.scaler.min_scale} and still overflows"
            if at_floor
            else f"{self.scaler.consecutive_skips} steps in a row were skipped"
        )
        raise RuntimeError(
            f"MasterWeightPrecision: inf/NaN gradients at global step {step}: {reason}. Training would only go on"
            " with NaN; check the data and the loss (compute it in float32), or lower the learning rate."
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        """``{"dtype": str, "scaler": dict, "masters": [[FP32 tensor]], "names": [[str]]}``, a list per opt.

        Only tensors, numbers, strings, lists and dicts, so checkpoints load with ``weights_only=True``.
        ``names`` are the parameters' names in the LightningModule (the checkpoint's ``state_dict`` keys).
        """
        state = {
            "dtype": self.dtype_name,
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "masters": [[m.detach() for m in entry.master_params] for _, entry in self._masters],
            "names": [list(entry.names) for _, entry in self._masters],
            "plan": self.plan.to_dict(),
        }
        if self.advisor is not None:
            state["advisor"] = self.advisor.state_dict()
        return state

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints written before the rename keep this plugin's state under its old class name,
        ``MixedPrecision``, which is also the key of Lightning's AMP plugin (``16-mixed``): move ours to the
        current key, and refuse the AMP one (GradScaler state, no masters) with a message that says so."""
        old = checkpoint.get(LEGACY_STATE_KEY)
        if old is None or type(self).__qualname__ in checkpoint:
            return
        if "masters" not in old:
            raise ValueError(
                f"This checkpoint's {LEGACY_STATE_KEY!r} entry has no FP32 masters (keys: {sorted(old)}): it was"
                " written by Lightning's precision='16-mixed'/'bf16-mixed' (AMP), not by +precision=mixed. Resume it"
                " with +precision=amp, or start a new +precision=mixed run from its weights."
            )
        checkpoint[type(self).__qualname__] = checkpoint.pop(LEGACY_STATE_KEY)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the scaler and copy the saved masters into the current ones (exact FP32)."""
        if self._dtype is None or (state_dict["masters"] and not self._masters):
            self._pending_state = state_dict  # connect() applies it once the masters exist
            return
        assert self.scaler is not None
        if state_dict["dtype"] == self.dtype_name:
            self.scaler.load_state_dict(state_dict["scaler"])
        else:
            log.warning(
                "MasterWeightPrecision: checkpoint trained in %s, now %s: loading the FP32 masters, not the scaler",
                state_dict["dtype"],
                self.dtype_name,
            )
        if len(state_dict["masters"]) != len(self._masters):
            n_saved, n_run = len(state_dict["masters"]), len(self._masters)
            raise ValueError(f"Checkpoint has masters for {n_saved} optimizers, the run has {n_run}")
        self._resume_plan(state_dict)
        saved_names = state_dict.get("names", [None] * len(self._masters))
        for (_, entry), saved, names in zip(self._masters, state_dict["masters"], saved_names, strict=True):
            if names is not None and list(names) != entry.names:
                raise ValueError("Checkpoint masters belong to other parameters than this optimizer's.")
            if len(saved) != len(entry.master_params):
                n_run = len(entry.master_params)
                raise ValueError(f"Checkpoint has {len(saved)} masters, the optimizer {n_run} parameters.")
            with torch.no_grad():
                torch._foreach_copy_(entry.master_params, list(saved))
            self._copy_to_model(entry)  # the model must hold the rounded masters, exactly as after a step

    def _resume_plan(self, state_dict: dict[str, Any]) -> None:
        """Promote again what the saved run promoted (same modules, same pairing of weights and masters, so the
        resumed run is bit-identical to an uninterrupted one) and restore the advisor's counts."""
        saved = PrecisionPlan.from_dict(state_dict.get("plan") or {}, source="checkpoint precision plan")
        new: list[Decision] = [d for d in saved.decisions if d.layer not in self.plan.fp32_modules]
        if new:
            assert self._module is not None, "connect() saw no LightningModule"
            self.promote(self._module, [d.layer for d in new])
            self.plan.fp32_modules += [d.layer for d in new]
            self.plan.decisions += new
        if self.advisor is not None and "advisor" in state_dict:
            self.advisor.load_state_dict(state_dict["advisor"])

    @override
    def teardown(self) -> None:
        # the FP32 gradient buffers are only needed during steps; masters stay for save_checkpoint after fit
        for _, entry in self._masters:
            entry.grad_buffers = None
            for m in entry.low_master:
                m.grad = None
        # state loaded by a run without optimizers (validate/test) must not land on the masters of a later fit
        self._pending_state = None
