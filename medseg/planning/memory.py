"""Memory and compute of one training step, counted without computing: the net runs on the `meta` device.

Autograd's saved tensors are what a training step holds at its peak (the forward's activations, kept for
backward), so their bytes, counted with `saved_tensors_hooks` as `benchmarks/saved_memory.py` does, are the
part of the peak that grows with patch and batch. Meta tensors have shapes and dtypes but no data, so a 128^3
forward costs milliseconds. benchmarks/plan_memory.py checks the model against real peak memory.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from medseg.models.loss import deep_supervision_loss, planned_loss
from medseg.planning.nets import DYNUNET, PlannedNet
from medseg.precision.convert import to_low_precision

# Bytes per parameter outside the activations: FP32 weights, gradients and AdamW's two moments (16); the low
# dtype adds low-precision weights and gradients beside the FP32 masters (+4).
PARAM_BYTES = {None: 16, torch.bfloat16: 20, torch.float16: 20}
# Real peaks exceed the saved tensors: backward holds activation gradients beside them, and the allocator and
# oneDNN keep scratch. Fitted to CPU peaks of benchmarks/plan_memory.py (DynUNet 32-96^3, fp32 and bf16) so that
# every measured peak stays under the model (benchmarks/RESULTS.md, "Planner memory model").
OVERHEAD, OVERHEAD_BYTES = 1.35, 64 * 2**20


@dataclass(frozen=True)
class StepCost:
    """One training step of batch 1 at a patch: `saved` bytes autograd keeps (net and FP32 loss), `fixed`
    bytes for parameters, gradients and optimizer state, and forward+backward `flops`."""

    saved: int
    fixed: int
    flops: int

    def bytes(self, batch: int) -> int:
        """Expected peak memory of a step at `batch`."""
        return int(OVERHEAD * (self.fixed + batch * self.saved)) + OVERHEAD_BYTES


def _saved_bytes(fn) -> tuple[object, int]:
    """Runs `fn()`; returns its result and the bytes of distinct storages autograd saved meanwhile. Storages are
    told apart by their C++ object (`_cdata`): meta storages all have data_ptr 0."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage._cdata] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    return out, sum(storages.values())


def step_cost(
    in_channels: int,
    num_classes: int,
    patch: Sequence[int],
    spacing: Sequence[float],
    filters: Sequence[int],
    low_dtype: torch.dtype | None,
    net: PlannedNet = DYNUNET,
) -> StepCost:
    """Counts one batch-1 training step of the planned net (the DynUNet with deep supervision, or the chosen
    model's), batch Dice + CE loss in FP32 as training runs it (`medseg.models.loss`); `low_dtype` None for FP32,
    else the plugin's dtype."""
    planned = net
    with torch.device("meta"):
        net = planned.build(in_channels, num_classes, patch, spacing, filters)
        if low_dtype is not None:
            to_low_precision(net, low_dtype)
        image = torch.empty(1, in_channels, *patch, dtype=low_dtype or torch.float32)
        label = torch.empty(1, 1, *patch)
        with FlopCounterMode(display=False) as counter:
            logits, net_bytes = _saved_bytes(lambda: net(image))
    # outside the meta device context: MONAI's Dice makes a CPU index tensor (arange(...).tolist())
    loss = planned_loss()
    _, loss_bytes = _saved_bytes(lambda: deep_supervision_loss(loss, logits, label))
    inputs = image.nbytes + label.nbytes
    # Backward's C-channel transients, which no saved tensor shows: the FP32 gradient of every head's logits
    # (B, S, C, X, Y, Z) lives while the loss's backward runs. Negligible at 3 classes (the calibration of OVERHEAD),
    # it is what grows with the class count: 105 classes at 32^3 measured 1.31x the count without it.
    logit_grads = logits.numel() * 4
    params = sum(p.numel() for p in net.parameters())
    # backward costs about twice the forward (gradients of inputs and of weights)
    saved = net_bytes + loss_bytes + inputs + logit_grads
    return StepCost(saved, params * PARAM_BYTES[low_dtype], 3 * counter.get_total_flops())
