"""A plan as a Hydra experiment file (readable, committable, overridable key by key), and back to overrides.

python -m medseg.train plan=<run dir>/training_plan.yaml           # a saved plan, any key on the command line wins
python -m medseg.train experiment=<name>                  # the same file copied to conf/experiment/<name>.yaml
"""

from pathlib import Path

import numpy as np
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from medseg.config_check import ConfigError
from medseg.planning.memory import OVERHEAD, OVERHEAD_BYTES
from medseg.planning.planner import TrainingPlan


def _duration(seconds: float) -> str:
    """`trainer.max_time`'s DD:HH:MM:SS."""
    s = int(seconds)
    return f"{s // 86400:02d}:{s % 86400 // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def fit_seconds(plan: TrainingPlan) -> float:
    """`trainer.max_time`, which bounds `fit` alone: the budget less the planning at start-up and the final test
    pass, so that the whole run fits the budget (at least half of it is left to `fit`)."""
    budget = plan.budget.time_seconds
    return max(budget / 2, budget - plan.planning_seconds - plan.test_seconds)


def plan_config(plan: TrainingPlan) -> dict:
    """The keys the plan sets, nested as in conf/train.yaml."""
    data = {"root": plan.root, "spacing": plan.spacing, "patch_size": plan.patch, "batch_size": plan.batch}
    data["num_samples"] = 1  # nnU-Net: one patch per image; the batch is the planned number of patches
    if plan.ct_window is not None:
        data["ct_window"] = plan.ct_window
    return {
        "plan": "none",  # this file is the plan: do not plan again
        "data": data,
        "model": {
            **({"net": {"filters": plan.filters}} if plan.filters else {}),  # a chosen model keeps its widths
            "loss": {"batch": True},  # nnU-Net's batch Dice, as both hand-tuned presets use
            "test_mirror_axes": [0, 1, 2],
        },
        "trainer": {
            **({"max_epochs": plan.epochs} if plan.epochs else {}),
            "max_time": _duration(fit_seconds(plan)),
            "check_val_every_n_epoch": plan.val_every,
        },
    }


def plan_yaml(plan: TrainingPlan) -> str:
    """The plan file: a header of comments saying what was measured and decided, then the experiment."""
    gib = 2**30
    lines = [
        "# @package _global_",
        f"# medseg plan for {plan.root}, precision {plan.precision} on {plan.device}",
        f"# target spacing {plan.spacing} mm; after resampling median shape {plan.median_shape}, "
        f"smallest {plan.min_shape}",
        f"# DynUNet strides {plan.strides}" if plan.strides else f"# model {plan.model} as conf/model configures it",
        f"# memory: {plan.memory / gib:.2f} GiB per step (meta-device count x{OVERHEAD} + "
        f"{OVERHEAD_BYTES // 2**20} MiB) of a "
        f"{plan.budget.memory / gib:.2f} "
        "GiB budget",
        f"# time budget {_duration(plan.budget.time_seconds)} (fit {_duration(fit_seconds(plan))}: less "
        f"{plan.planning_seconds:.0f} s of planning at start-up and {plan.test_seconds:.0f} s estimated for the "
        "final test pass)",
        "# step "
        + (f"{plan.step_seconds:.2f} s (measured)" if plan.step_seconds else "not measured")
        + (f" ({plan.step_seconds / plan.batch:.2f} s a patch)" if plan.step_seconds else "")
        + (f", budget {plan.budget.patch_seconds:.2f} s a patch" if plan.budget.patch_seconds else "")
        + f"; {plan.flops * plan.batch / 1e9:.3g} GFLOP per step",
        *[f"# {note}" for note in plan.notes],
        "# Train: python -m medseg.train plan=<this file> +precision=" + plan.precision,
        "defaults:",
        "  - override /data: msd",
        f"  - override /model: {plan.model}",
        "",
    ]
    return "\n".join(lines) + yaml.safe_dump(plan_config(plan), default_flow_style=None, sort_keys=False)


def _value(value) -> str:
    """A value as Hydra's override grammar reads it back (strings quoted: paths hold '/', ':' and '.')."""
    if isinstance(value, list | ListConfig):
        return "[" + ",".join(_value(v) for v in value) + "]"
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if value is None:
        return "null"
    if isinstance(value, bool | np.bool_):
        return str(bool(value)).lower()
    return repr(value)


def _leaves(node: DictConfig, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, DictConfig):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def read_plan(path: str | Path) -> DictConfig:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"plan: no plan file at {path}")
    plan = OmegaConf.load(path)
    if not isinstance(plan, DictConfig) or "data" not in plan:
        raise ConfigError(f"plan: {path} is not a medseg plan (no data: section)")
    return plan


def validation_interval(max_epochs: int, planned: int) -> int:
    """`trainer.check_val_every_n_epoch` for a run whose `max_epochs` the command line shortened: the plan's
    interval, or less, so that the run has at least two validation rounds (one when it has one epoch) and its
    last epoch is one of them (the best checkpoint can be the final weights): the largest divisor of
    `max_epochs` that is at most `planned` and at most half of `max_epochs`."""
    top = max(1, min(planned, max_epochs // 2))
    return next(d for d in range(top, 0, -1) if max_epochs % d == 0)


def plan_overrides(plan: DictConfig, cli: list[str]) -> list[str]:
    """The plan as Hydra overrides, minus what the command line sets: a key (or a group) given there wins, and a
    model chosen there drops the plan's model keys (they belong to the planned DynUNet). A `trainer.max_epochs`
    given there (and no `trainer.check_val_every_n_epoch`) shortens the plan's validation interval to fit it."""
    values = {o.lstrip("+~").split("=", 1)[0]: o.split("=", 1)[-1] for o in cli}
    plan = plan.copy()
    interval = OmegaConf.select(plan, "trainer.check_val_every_n_epoch")
    epochs = values.get("trainer.max_epochs", "")
    shortened = epochs.isdigit() and int(epochs) > 0 and "trainer.check_val_every_n_epoch" not in values
    if interval is not None and shortened:
        plan.trainer.check_val_every_n_epoch = validation_interval(int(epochs), int(interval))
    out = []
    for entry in plan.get("defaults", []):
        ((group, choice),) = entry.items()
        group = group.removeprefix("override /")
        if group not in values:
            out.append(f"{group}={choice}")
    for key, value in _leaves(plan):
        if key == "defaults" or key in values or (key.startswith("model.") and "model" in values):
            continue
        out.append(f"++{key}={_value(value)}")  # ++: some keys (model.loss.batch) are not in conf/
    return out
