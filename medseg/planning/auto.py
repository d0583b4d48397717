"""Planning a folder end to end: fingerprint, budgets, the plan, then real steps that check (and correct) it."""

import logging
import os
import re
from pathlib import Path

import numpy as np
import torch

from medseg.config_check import ConfigError
from medseg.data.datamodule import num_validation
from medseg.planning.fingerprint import read_fingerprint
from medseg.planning.measure import measure_steps
from medseg.planning.nets import DYNUNET, PlannedNet
from medseg.planning.planner import (
    PATCHES_PER_CASE,
    SLACK,
    TRAIN_SHARE,
    Budget,
    TrainingPlan,
    fit_to_net,
    low_dtype,
    make_plan,
    net_cost,
    training_length,
)

log = logging.getLogger(__name__)

GPU_SHARE = 0.85  # of the device's memory: room for the CUDA context, cuDNN workspaces and fragmentation
RAM_SHARE = 0.5  # of the machine's memory on a CPU: the data loader's workers and caches need the rest
MAX_CORRECTIONS = 3
PROBE_VOXELS = 96**3  # calibration patch size (at most): a few seconds a step on a CPU at a few classes
PROBE_CLASSES = 8  # above this many classes the probe shrinks in proportion: its logits, softmax and loss
# (C channels, every deep-supervision head at full resolution) cost as much as an 8-class probe's
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

# The default wall clock of a planned run (`planner.time`, `medseg.plan --time-budget`); conf/train.yaml restates it.
TIME_BUDGET = "30m"


def parse_duration(text: str | float) -> float:
    """'30m', '1h30m', '90s', '2h' or a number of seconds -> seconds."""
    if isinstance(text, int | float):
        return float(text)
    parts = re.fullmatch(r"((\d+(\.\d+)?)[smhd])+", str(text).strip())
    if not parts:
        raise ConfigError(f"plan: time budget must look like 30m, 1h30m or 90s, got {text!r}")
    return sum(float(n) * _UNITS[u] for n, _, u in re.findall(r"(\d+(\.\d+)?)([smhd])", str(text)))


def parse_bytes(text: str | int) -> int:
    """'8G', '512M', '24GiB' or a number of bytes -> bytes."""
    if isinstance(text, int | float):
        return int(text)
    match = re.fullmatch(r"(\d+(\.\d+)?)\s*([KMGT]?)(i?B)?", str(text).strip(), re.IGNORECASE)
    if not match:
        raise ConfigError(f"plan: memory budget must look like 8G or 512M, got {text!r}")
    return int(float(match[1]) * 1024 ** "_KMGT".index((match[3] or "_").upper()))


def default_memory(device: str) -> int:
    if device == "cuda":
        return int(torch.cuda.get_device_properties(0).total_memory * GPU_SHARE)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * RAM_SHARE)


def make_budget(
    device: str, time: str | float, memory: str | int | None, patch_seconds: float | None, train_cases: int
) -> Budget:
    """Budgets with their defaults: the memory share of the device; on a CPU a time per patch that lets the
    budget draw PATCHES_PER_CASE patches from each of the `train_cases` (a GPU is fast enough that memory decides)."""
    seconds = parse_duration(time)
    if patch_seconds is not None and not patch_seconds > 0:
        raise ConfigError(f"planner.patch_seconds must be a positive number of seconds, got {patch_seconds!r}")
    if patch_seconds is None and device == "cpu":
        patch_seconds = seconds * TRAIN_SHARE / (PATCHES_PER_CASE * max(1, train_cases))
    mem = parse_bytes(memory) if memory is not None else default_memory(device)
    return Budget(memory=mem, time_seconds=seconds, patch_seconds=patch_seconds)


def _measure(plan: TrainingPlan, fp, dtype, net: PlannedNet) -> tuple[float, int | None]:
    try:
        m = measure_steps(
            len(fp.modalities), fp.num_classes, plan.patch, plan.spacing, plan.filters, plan.batch, dtype,
            plan.device, net=net,
        )  # fmt: skip
    except torch.OutOfMemoryError:
        return float("inf"), None
    return m.seconds, m.peak


def plan_dataset(
    root: str | Path,
    precision: str = "mixed",
    time: str | float = TIME_BUDGET,
    memory: str | int | None = None,
    patch_seconds: float | None = None,
    device: str | None = None,
    measure: bool = True,
    val_fraction: float = 0.2,
    net: PlannedNet = DYNUNET,
) -> TrainingPlan:
    """The plan for `root`. With `measure`, a first step at a small patch calibrates seconds per FLOP, and real
    steps at the planned patch and batch check it: a plan whose patches run over the time budget, or (CUDA)
    whose peak memory is over the memory budget, is planned again with the correction, and a log line says so.
    `net`: the DynUNet nnU-Net's rules size, or the model the user chose (`medseg.planning.nets`)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    fp = read_fingerprint(root)
    train_cases = fp.num_cases - num_validation(fp.num_cases, val_fraction)
    budget = make_budget(device, time, memory, patch_seconds, train_cases)
    dtype = low_dtype(precision, device)
    plan = make_plan(fp, precision, budget, device, val_fraction=val_fraction, net=net)
    if not measure:
        return plan
    # seconds per FLOP from real steps of the memory plan (its patch scaled down to PROBE_VOXELS, its batch): a CPU
    # runs small convolutions and small batches at far fewer FLOP/s than large ones (a patch at batch 2 ran slower
    # than at batch 7 on hippocampus), so a probe much smaller than the plan would make it shrink too far; from
    # above, each correction measures a patch larger than the next one
    probe_voxels = PROBE_VOXELS * min(1.0, PROBE_CLASSES / fp.num_classes)
    scale = min(1.0, (probe_voxels / np.prod(plan.patch)) ** (1 / 3))
    probe = fit_to_net(np.asarray(plan.patch) * scale, plan.spacing, limit=plan.patch, net=net)
    probe_cost, filters = net_cost(fp, probe, np.asarray(plan.spacing), dtype, device, net)
    probe_time = measure_steps(
        len(fp.modalities), fp.num_classes, probe.tolist(), plan.spacing, filters, plan.batch, dtype, device, net=net
    ).seconds
    seconds_per_flop, memory_scale = probe_time / (probe_cost.flops * plan.batch), 1.0
    tried: dict[tuple, float] = {}
    regrown = False
    for _ in range(MAX_CORRECTIONS + 1):
        scaled = Budget(int(budget.memory / memory_scale), budget.time_seconds, budget.patch_seconds)
        plan = make_plan(fp, precision, scaled, device, seconds_per_flop, val_fraction, net)
        plan.budget = budget
        if (key := (tuple(plan.patch), plan.batch)) in tried:
            seconds = tried[key]
            break  # the correction changed nothing (e.g. already the smallest patch)
        seconds, peak = _measure(plan, fp, dtype, net)
        tried[key] = seconds
        if peak is not None and peak > budget.memory or not np.isfinite(seconds):
            log.warning(
                "plan: patch %s batch %d peaked at %s bytes, over the %d byte memory budget: planning again",
                plan.patch, plan.batch, peak or "out-of-memory", budget.memory,
            )  # fmt: skip
            memory_scale *= peak / plan.memory if peak else 1.5
            continue
        measured_spf = seconds / (plan.flops * plan.batch)
        if budget.patch_seconds is not None and seconds / plan.batch > SLACK * budget.patch_seconds:
            log.warning(
                "plan: patch %s batch %d took %.2f s per patch, over the %.2f s time budget per patch: planning again",
                plan.patch, plan.batch, seconds / plan.batch, budget.patch_seconds,
            )  # fmt: skip
            seconds_per_flop = measured_spf
            continue
        if budget.patch_seconds is not None and not regrown and measured_spf * SLACK < seconds_per_flop:
            # the calibration ran at the memory plan's patch scaled down, slower per voxel than the plan's own steps:
            # plan once more at the measured speed, which may keep a larger patch (measured again before it is taken)
            log.info("plan: patch %s batch %d ran faster than calibrated: planning again", plan.patch, plan.batch)
            seconds_per_flop, regrown = measured_spf, True
            continue
        break
    plan.step_seconds = seconds
    plan.notes.append(f"measured {seconds:.2f} s per step on {device}")
    training_length(plan, fp.num_cases, val_fraction)
    return plan
