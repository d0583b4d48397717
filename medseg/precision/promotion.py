"""Promotion: the part of ``MasterWeightPrecision`` that applies the precision plan (``precision.precision_plan``).
It checks the plan's modules against the net, keeps more modules in FP32 while training runs, on the precision
advisor's decisions (``medseg.precision.advisor``: overflows; ``medseg.precision.headroom``: FP16 headroom), and
records them in the plan, saved beside the run and in its checkpoints.

A mixin: it works on the plugin's masters, dtype, plan and advisor (declared below), so that ``plugin.py`` holds
the Lightning hooks and the step alone.
"""

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from medseg.precision.advisor import PrecisionAdvisor, locate, overflow_line
from medseg.precision.convert import LOSS_TYPES, keep_fp32
from medseg.precision.masters import Masters, copy_to_model
from medseg.precision.precision_plan import (
    PLAN_FILE,
    Decision,
    PrecisionPlan,
    PrecisionPlanError,
    match_modules,
    save_plan,
)
from medseg.precision.scaler import DynamicLossScaler

log = logging.getLogger("medseg.precision.plugin")  # the plugin's messages, under the plugin's logger


class Promotion:
    """Applies the advisor's decisions to the running model: promote, record in the plan, save the plan."""

    precision_plan: PrecisionPlan
    advisor: PrecisionAdvisor | None
    scaler: DynamicLossScaler | None
    dtype_name: str
    _dtype: torch.dtype | None
    _masters: list[tuple[Optimizer, Masters]]
    _module: "pl.LightningModule | None"
    _plan_dir: Path | None

    def check_plan(self, module: nn.Module) -> list[str]:
        """The names of ``module``'s submodules the plan keeps in FP32; a ``PrecisionPlanError`` naming the patterns
        that match none of them, or a loss."""
        names = match_modules(module, self.precision_plan.fp32_modules, "precision.plugin.fp32_modules")
        if any(isinstance(module.get_submodule(n), LOSS_TYPES) for n in names):
            raise PrecisionPlanError(
                f"precision.plugin.fp32_modules: {names} include a loss; losses compute in FP32 anyway"
            )
        return names

    @rank_zero_only
    def _save_plan(self) -> None:
        if self._plan_dir is not None:
            save_plan(self.precision_plan, self._plan_dir / PLAN_FILE)

    def promote(self, module: "pl.LightningModule", names: Sequence[str]) -> None:
        """Keep the named modules of ``module`` in FP32 from now on (``keep_fp32``), their weights set to their FP32
        masters bit for bit; the masters and the optimizer state are not touched. Under DDP the model is wrapped
        again, since DDP's gradient buckets are made for the dtypes the parameters had."""
        assert self._dtype is not None
        for name in names:
            keep_fp32(module.get_submodule(name), self._dtype)
        for _, entry in self._masters:
            copy_to_model(entry)  # same FP32 master, now copied exactly; its pairing stays as it was
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
        if decision.layer in self.precision_plan.fp32_modules:
            return
        if isinstance(model.get_submodule(decision.layer), LOSS_TYPES):
            rank_zero_only(log.warning)(f"precision advisor: {decision.line()}: a loss, already FP32; not promoted")
            return
        self.promote(model, [decision.layer])
        self.precision_plan.fp32_modules.append(decision.layer)
        self.precision_plan.decisions.append(decision)
        rank_zero_only(log.warning)(f"precision advisor: {decision.line()}")
        self._save_plan()

    def _resume_plan(self, state_dict: dict[str, Any]) -> None:
        """Promote again what the saved run promoted (same modules, same pairing of weights and masters, so the
        resumed run is bit-identical to an uninterrupted one) and restore the advisor's counts."""
        saved = PrecisionPlan.from_dict(state_dict.get("plan") or {}, source="checkpoint precision plan")
        new: list[Decision] = [d for d in saved.decisions if d.layer not in self.precision_plan.fp32_modules]
        if new:
            assert self._module is not None, "connect() saw no LightningModule"
            self.promote(self._module, [d.layer for d in new])
            self.precision_plan.fp32_modules += [d.layer for d in new]
            self.precision_plan.decisions += new
        if self.advisor is not None and "advisor" in state_dict:
            self.advisor.load_state_dict(state_dict["advisor"])

    def _samples_lost_updates(self, entry: Masters, model: "pl.LightningModule") -> bool:
        """Whether the advisor samples lost updates on this step (it needs the masters before the step)."""
        if self.advisor is None or model._trainer is None or not entry.low_master:
            return False
        return self.advisor.samples_lost_updates(model.trainer.global_step)

    def _report_lost_updates(self, entry: Masters, before: Tensor, model: "pl.LightningModule") -> None:
        """Per module, the share of this step's master updates the low-precision weights cannot show, from the
        masters' copy taken before the step (``Masters.snapshot``, shared with ``PrecisionMonitor``)."""
        assert self.advisor is not None and self._dtype is not None
        low = entry.low_master
        befores = [b.view_as(m) for b, m in zip(before.split([m.numel() for m in low]), low, strict=True)]
        shares = self.advisor.record_lost_updates(entry.low_names(), befores, low, self._dtype)
        top = sorted(shares.items(), key=lambda kv: -kv[1])[:3]
        listed = ", ".join(f"{name} {share:.1%}" for name, share in top)
        rank_zero_only(log.info)(
            f"precision advisor: step {model.trainer.global_step}: updates lost to {self.dtype_name} rounding: {listed}"
        )
