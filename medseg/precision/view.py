"""What code outside ``medseg.precision`` may read from medseg's master-weight plugin, and how it finds the plugin.

Callbacks, the LightningModule, the trainer script and the run summary ask one question, "does this trainer run
``MasterWeightPrecision``, and what does it know?", through ``master_weights(trainer)``, instead of importing the
plugin (and with it Lightning's precision machinery) to branch on ``isinstance``. Light: no Lightning import.
"""

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

if TYPE_CHECKING:
    from medseg.precision.advisor import PrecisionAdvisor
    from medseg.precision.precision_plan import PrecisionPlan
    from medseg.precision.scaler import DynamicLossScaler


@runtime_checkable
class MasterWeightView(Protocol):
    """The read side of ``medseg.precision.plugin.MasterWeightPrecision`` (FP16/BF16 weights, FP32 masters).

    Attributes:
        dtype: the low dtype the weights are held in; None until ``dtype="auto"`` is resolved (``convert_module``).
        precision_plan: ``precision_plan.fp32_modules`` (globs or class names kept in FP32, configured and
            promoted), ``precision_plan.decisions`` (the advisor's promotions).
        advisor: the precision advisor, or None; ``advisor.lost_updates``: module -> lost-update share at its
            last sampled step.
        scaler: the loss scaler; ``scaler.scale`` is the scale this step's backward ran with until the step ends.
        last_step: after each optimizer step ``{"loss_scale", "overflow", "skipped_steps"}`` (host numbers) and,
            with ``track_grad_norm``, ``"grad_norm"`` (a device tensor); ``{}`` before the first step.
    """

    dtype: torch.dtype | None
    precision_plan: "PrecisionPlan"
    advisor: "PrecisionAdvisor | None"
    scaler: "DynamicLossScaler | None"
    last_step: dict[str, Any]

    def param_pairs(self, optimizer: Optimizer) -> tuple[list[Tensor], list[Tensor]]:
        """``(model_params, master_params)`` of ``optimizer``, aligned; FP32 params are their own masters."""
        ...

    def masters_before_step(self, optimizer: Optimizer) -> Tensor:
        """The low-precision parameters' FP32 masters before this step's update, flattened in ``param_pairs``
        order (one copy per step, shared); call it from ``on_before_optimizer_step``."""
        ...

    def observe_headroom(
        self, model: nn.Module, step: int, acts: dict[str, float], out_grads: dict[str, float], scale: float
    ) -> None:
        """Hand one sampled step's per-layer abs-maxes to the advisor's FP16 headroom rule (it may promote)."""
        ...

    def check_plan(self, module: nn.Module) -> list[str]:
        """The names of ``module``'s submodules the plan keeps in FP32; a ``PrecisionPlanError`` for a pattern
        matching none."""
        ...


def master_weights(trainer: Any) -> MasterWeightView | None:
    """``trainer``'s precision plugin when it is medseg's master-weight plugin, else None (FP32, Lightning's AMP,
    ``*-true``)."""
    plugin = getattr(trainer, "precision_plugin", None)
    return plugin if isinstance(plugin, MasterWeightView) else None
