"""From a fingerprint and budgets to a plan: target spacing, patch, batch, network and training length.

The rules are nnU-Net's (target spacing, patch shrinking, the 5 % batch cap, a low-resolution stage for
volumes too large to train at full resolution), with its GPU-memory target replaced by budgets: memory for the
chosen precision (counted on the meta device, `medseg.planning.memory`) and, on a CPU, a time per training patch, so
that a fixed wall-clock budget still shows the net every training case often enough.
"""

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from medseg.config_check import ConfigError
from medseg.data.datamodule import num_validation
from medseg.models.dynunet import kernels_and_strides, nnunet_filters
from medseg.planning.fingerprint import Fingerprint
from medseg.planning.memory import StepCost, step_cost
from medseg.planning.nets import DYNUNET, PlannedNet
from medseg.precision.dtypes import auto_low_dtype

log = logging.getLogger(__name__)

ANISO = 3.0  # nnU-Net's threshold for an anisotropic axis (spacing and voxel count)
MIN_AXIS = 8  # smallest patch side: one halving down to nnU-Net's 4-voxel bottleneck
# A patch shrinks for the time budget only down to this share of the median shape per side (memory has no
# floor): nnU-Net's patches never shrink for time, and a patch much smaller than the structure loses its context.
# Below it the spacing is coarsened instead (nnU-Net's 3d_lowres), by COARSEN per round, at most MAX_COARSEN rounds.
TIME_FLOOR = 0.5
COARSEN = 1.25
MAX_COARSEN = 4
MIN_BATCH = 2  # nnU-Net's floor: instance norm and batch Dice need more than one patch
DATASET_SHARE = 0.05  # nnU-Net: one batch covers at most 5 % of the dataset's voxels
# On a CPU the time per patch is the budget's training share over this many patches per training case: both
# hand-tuned CPU presets reached their Dice drawing about 100 (hippocampus 100 epochs x 1, BraTS 60 epochs x 2).
PATCHES_PER_CASE = 100
SLACK = 1.25  # a patch may be estimated or measured this much over its time budget before it shrinks
TRAIN_SHARE = 0.9  # of the time budget; the rest is start-up (planning, caching) and slack
VAL_SHARE = 0.25  # at most this share of the time budget goes to validation and the final test pass
VAL_ROUNDS = 10  # validation rounds per run (trainer.check_val_every_n_epoch follows)
PRECISIONS = ("fp32", "mixed", "mixed_bf16", "half", "bf16", "amp")


def low_dtype(precision: str, device: str) -> torch.dtype | None:
    """The activation dtype a `conf/precision/<name>` runs in; None for fp32 (`mixed`'s `dtype: auto` is FP16
    on CUDA and BF16 elsewhere; Lightning's 16-mixed is BF16 autocast on CPU)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"plan: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return None
    if precision in ("mixed_bf16", "bf16"):
        return torch.bfloat16
    return auto_low_dtype(device)


def filters_for(num_levels: int, device: str) -> list[int]:
    """nnU-Net's 32, 64, ... capped at 320 on a GPU; half as wide on a CPU, as both hand-tuned CPU presets are."""
    return nnunet_filters(num_levels, base=32 if device == "cuda" else 16)


def target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> np.ndarray:
    """nnU-Net's rule: the median spacing; but when one axis is both much coarser (> 3x the others' spacing)
    and much shorter (3x its voxel count < the others'), its 10th percentile, so thick-slice scans are not
    interpolated down to the few thinnest ones. `spacings`, `shapes`: (N, 3)."""
    target = np.median(spacings, axis=0)
    sizes = np.median(shapes, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(3) if a != worst]
    if target[worst] > ANISO * target[others].max() and sizes[worst] * ANISO < sizes[others].min():
        target[worst] = max(np.percentile(spacings[:, worst], 10), target[others].max() + 1e-5)
    return target


def stride_factors(patch: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """Per axis, the product of the DynUNet's strides for this patch: every patch side must be a multiple."""
    return DYNUNET.factors(patch, spacing)


def fit_to_net(
    patch: Sequence[float], spacing: Sequence[float], limit: Sequence[float], net: PlannedNet = DYNUNET
) -> np.ndarray:
    """Each side a multiple of the net's stride product: rounded up (nnU-Net pads the median shape up) where the
    largest image still holds it (`limit`, the data module refuses a patch larger than every image), else down;
    never under the net's smallest side. The DynUNet's depth depends on the patch, so this repeats until it
    settles. A SwinUNETR patch of one bottleneck voxel grows its longest axis by one factor."""
    smallest = net.min_axis
    patch, limit = np.maximum(np.round(np.asarray(patch, float)), smallest), np.asarray(limit, float)
    for _ in range(8):
        factors = net.factors(patch.astype(int), spacing)
        up, down = np.ceil(patch / factors) * factors, np.floor(patch / factors) * factors
        fitted = np.where((up <= limit) | (down < smallest), up, down)
        if not net.takes(fitted.astype(int), spacing) and (fitted == smallest).all():
            fitted[int(np.argmax(limit))] += factors[int(np.argmax(limit))]
        if np.array_equal(fitted, patch):
            break
        patch = fitted
    return patch.astype(int)


@dataclass
class Budget:
    """memory: bytes a training step may hold; patch_seconds: training time per patch, forward + backward +
    its share of the optimizer step (None: no limit); time_seconds: the whole run's wall-clock budget (becomes
    `trainer.max_time`)."""

    memory: int
    time_seconds: float
    patch_seconds: float | None = None


@dataclass
class TrainingPlan:
    """What the planner chose and why; `medseg.planning.plan_file` writes it as a Hydra experiment file."""

    root: str
    precision: str
    device: str
    spacing: list[float]
    median_shape: list[int]
    min_shape: list[int]
    patch: list[int]
    batch: int
    filters: list[int]
    strides: list[list[int]]
    memory: int
    budget: Budget
    flops: int
    ct_window: list[float] | None = None
    step_seconds: float | None = None
    epochs: int | None = None  # None: no step time measured; trainer.max_time alone stops the run
    val_every: int = 1
    # Wall time the run spends outside `fit`, taken off `trainer.max_time` (which bounds `fit` alone) so that the
    # whole run, planning to final test, fits the budget: planning at start-up (plan=auto; 0 for a plan file made
    # beforehand), and the final test pass's estimate.
    planning_seconds: float = 0.0
    test_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    model: str = "dynunet"  # the conf/model the plan is for (`PlannedNet.name`); filters and strides: DynUNet only


def net_cost(
    fp: Fingerprint, patch: np.ndarray, spacing: np.ndarray, dtype, device: str, net: PlannedNet = DYNUNET
) -> tuple[StepCost, list]:
    """The batch-1 step cost of the planned net at `patch`, and the net's filters ([] for a chosen model, which
    keeps its own widths)."""
    filters = []
    if net.is_dynunet:
        filters = filters_for(len(kernels_and_strides(patch.tolist(), spacing.tolist())[1]), device)
    cost = step_cost(len(fp.modalities), fp.num_classes, patch.tolist(), spacing.tolist(), filters, dtype, net=net)
    return cost, filters


def _can_shrink(patch: np.ndarray, factors: np.ndarray, axis: int, spacing: np.ndarray, net: PlannedNet) -> bool:
    """One stride product off `axis` leaves a patch the net takes (the DynUNet 3 levels deep for deep supervision)."""
    smaller = patch.copy()
    smaller[axis] -= factors[axis]
    return smaller[axis] >= net.min_axis and net.takes(smaller, spacing)


def choose_patch_and_batch(
    fp: Fingerprint,
    spacing: np.ndarray,
    budget: Budget,
    dtype,
    device: str,
    seconds_per_flop: float | None,
    net: PlannedNet = DYNUNET,
) -> tuple[np.ndarray, int, StepCost, bool]:
    """nnU-Net's search: start from the median shape (padded to the net), shrink the side that is largest
    relative to the median shape by one stride product until batch 2 fits the budgets, then grow the batch.
    The last value says whether the patch met the time budget (False: it stopped at TIME_FLOOR)."""
    median = np.median(fp.resampled_shapes(spacing), axis=0)
    limit = np.floor(fp.largest_shape(spacing) + 0.5)

    def in_memory(cost: StepCost, batch: int) -> bool:
        return cost.bytes(batch) <= budget.memory

    def in_time(cost: StepCost, batch: int) -> bool:
        if not (seconds_per_flop and budget.patch_seconds):
            return True
        return cost.flops * seconds_per_flop <= SLACK * budget.patch_seconds

    patch = fit_to_net(median, spacing, limit, net)
    cost, _ = net_cost(fp, patch, spacing, dtype, device, net)
    while not (in_memory(cost, MIN_BATCH) and in_time(cost, MIN_BATCH)):
        factors = net.factors(patch, spacing)
        shrinkable = np.array([_can_shrink(patch, factors, axis, spacing, net) for axis in range(3)])
        if in_memory(cost, MIN_BATCH):  # only the step time is over: context matters more than the step count
            shrinkable &= patch - factors >= TIME_FLOOR * median
        if not shrinkable.any():
            if not in_memory(cost, MIN_BATCH):  # memory is a hard limit, step time a wish
                raise ConfigError(
                    f"plan: the smallest patch {patch.tolist()} at batch {MIN_BATCH} needs "
                    f"{cost.bytes(MIN_BATCH) / 2**30:.2f} GiB, over the memory budget of "
                    f"{budget.memory / 2**30:.2f} GiB"
                )
            return patch, MIN_BATCH, cost, False
        axis = int(np.argmax(np.where(shrinkable, patch / median, -np.inf)))
        patch[axis] -= factors[axis]
        patch = fit_to_net(patch, spacing, limit, net)
        cost, _ = net_cost(fp, patch, spacing, dtype, device, net)
    total_voxels = float(np.prod(fp.resampled_shapes(spacing), axis=1).sum())
    cap = max(MIN_BATCH, int(DATASET_SHARE * total_voxels / np.prod(patch)))
    batch = MIN_BATCH
    while batch < cap and in_memory(cost, batch + 1):
        batch += 1
    return patch, batch, cost, True


def coarser(spacing: np.ndarray) -> np.ndarray:
    """One COARSEN round: the finer axes grow towards the coarsest (an anisotropic scan becomes less so, as in
    nnU-Net's low-resolution stage); once all are equal, all grow."""
    grown = spacing * COARSEN
    if np.allclose(spacing, spacing.max()):
        return grown
    return np.where(spacing < spacing.max(), np.minimum(grown, spacing.max()), spacing)


def deep_enough(fp: Fingerprint, spacing: np.ndarray, net: PlannedNet = DYNUNET) -> bool:
    """At `spacing`, the median image still takes a net of 3 levels (deep supervision needs two halvings); for a
    chosen model, the largest image still holds a patch the net takes."""
    median = np.maximum(np.median(fp.resampled_shapes(spacing), axis=0).round(), MIN_AXIS)
    if not net.is_dynunet:
        limit = np.floor(fp.largest_shape(spacing) + 0.5)
        fitted = fit_to_net(median, spacing, limit, net)
        return bool((fitted <= limit).all() and net.takes(fitted, spacing))
    return len(kernels_and_strides(median.astype(int).tolist(), spacing.tolist())[1]) >= 3


def training_length(plan: TrainingPlan, num_cases: int, val_fraction: float) -> None:
    """Epochs from the measured step time: what the time budget leaves after start-up, the final (8x mirrored)
    test pass and up to VAL_ROUNDS sliding-window validation rounds (fewer when they would take over
    VAL_SHARE of the budget), over the time of one epoch; `trainer.max_time` stays the hard stop."""
    if not plan.step_seconds:
        return
    num_val = num_validation(num_cases, val_fraction)
    steps_per_epoch = max(1, (num_cases - num_val) // plan.batch)
    halves = np.maximum(np.asarray(plan.median_shape) / np.asarray(plan.patch), 1)
    windows = np.prod(np.ceil(halves * 2 - 1))  # overlap 0.5
    forward = plan.step_seconds / plan.batch / 3  # one patch's forward: a third of its forward+backward
    val_round = num_val * windows * forward
    test_pass = 8 * val_round
    plan.test_seconds = float(min(test_pass, VAL_SHARE * plan.budget.time_seconds))
    # at least 2 rounds: one by the middle of the run, so a run stopped early by max_time still has a best checkpoint
    rounds = int(np.clip((VAL_SHARE * plan.budget.time_seconds - test_pass) // max(val_round, 1e-9), 2, VAL_ROUNDS))
    seconds = plan.budget.time_seconds * TRAIN_SHARE - min(
        test_pass + rounds * val_round, VAL_SHARE * plan.budget.time_seconds
    )
    epochs = int(np.clip(seconds / (steps_per_epoch * plan.step_seconds), 1, 1000))
    plan.val_every = max(1, math.ceil(epochs / rounds))
    # a whole number of validation rounds: Lightning validates every val_every-th epoch, and the last epochs, where
    # the LR schedule has annealed, must be validated (else the best checkpoint can never be the final weights)
    plan.epochs = max(plan.val_every, epochs // plan.val_every * plan.val_every)


def make_plan(
    fp: Fingerprint,
    precision: str,
    budget: Budget,
    device: str = "cpu",
    seconds_per_flop: float | None = None,
    val_fraction: float = 0.2,
    net: PlannedNet = DYNUNET,
) -> TrainingPlan:
    """The plan for `fp` at `precision` within `budget`. Low precision never gets less than fp32 would at the
    same budget: if fp32's patch x batch is larger (batch rounding), that one is taken."""
    spacing = full = target_spacing(fp.spacings, fp.shapes * fp.crop)
    dtype = low_dtype(precision, device)
    notes = []
    for rounds in range(MAX_COARSEN + 1):
        patch, batch, cost, on_time = choose_patch_and_batch(fp, spacing, budget, dtype, device, seconds_per_flop, net)
        if on_time or rounds == MAX_COARSEN or not deep_enough(fp, coarser(spacing), net):
            break
        spacing = coarser(spacing)
    if not on_time:
        log.info("plan: patch %s is over the time budget at %s mm, but no coarser", patch.tolist(), spacing.tolist())
    if not np.allclose(spacing, full):
        notes.append(
            f"low resolution: {np.round(spacing, 3).tolist()} mm instead of {np.round(full, 3).tolist()} mm, because "
            f"at full resolution a patch of {TIME_FLOOR:g}x the median shape is over the time budget "
            f"({budget.patch_seconds:.2f} s a patch)"
        )
    if dtype is not None:
        p32, b32, _, _ = choose_patch_and_batch(fp, spacing, budget, None, device, seconds_per_flop, net)
        if np.prod(p32) * b32 > np.prod(patch) * batch:
            patch, batch = p32, b32
            cost, _ = net_cost(fp, patch, spacing, dtype, device, net)
        gain = np.prod(patch) * batch / (np.prod(p32) * b32)
        notes.append(
            f"{precision} ({str(dtype).removeprefix('torch.')} activations): patch x batch {gain:.2f}x fp32's "
            f"at this budget (fp32 would plan patch {p32.tolist()} batch {b32})"
        )
    resampled = fp.resampled_shapes(spacing)
    _, strides = kernels_and_strides(patch.tolist(), spacing.tolist())
    too_large = not net.is_dynunet and (patch > np.floor(fp.largest_shape(spacing) + 0.5)).any()
    if too_large or not net.takes(patch, spacing):  # DynUNet's deep supervision: two halvings; SwinUNETR 32-fold
        raise ConfigError(
            f"plan: images of {resampled.max(axis=0).round().tolist()} voxels at {np.round(spacing, 3).tolist()} mm "
            f"are too small for {'a 3D U-Net' if net.is_dynunet else 'model=' + net.name} "
            f"(it needs sides that are multiples of {net.min_axis}"
            + ("" if net.is_dynunet else "; a finer data.spacing makes the images larger")
            + ")"
        )
    ct_window = None
    if fp.is_ct:
        ct_window = [round(fp.intensity[0]["p00_5"], 1), round(fp.intensity[0]["p99_5"], 1)]
    plan = TrainingPlan(
        root=str(fp.root.resolve()),
        precision=precision,
        device=device,
        spacing=[round(float(s), 4) for s in spacing],
        median_shape=np.median(resampled, axis=0).round().astype(int).tolist(),
        min_shape=resampled.min(axis=0).round().astype(int).tolist(),
        patch=patch.tolist(),
        batch=int(batch),
        filters=filters_for(len(strides), device) if net.is_dynunet else [],
        strides=strides if net.is_dynunet else [],
        memory=cost.bytes(batch),
        budget=budget,
        flops=cost.flops,
        ct_window=ct_window,
        notes=notes,
        model=net.name,
    )
    if seconds_per_flop:
        plan.step_seconds = cost.flops * batch * seconds_per_flop
    training_length(plan, fp.num_cases, val_fraction)
    return plan
