"""The per-layer precision plan: which modules of a low-precision net keep FP32 weights and run their forward in
FP32, and why (the advisor's decisions). Read from and written to ``precision_plan.yaml``; no Lightning import."""

import fnmatch
import logging
from collections.abc import Iterable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from medseg.config_check import ConfigError
from medseg.precision.state import saved_state

PLAN_FILE = "precision_plan.yaml"


class PrecisionPlanError(ConfigError):
    """A precision plan (a file, or ``fp32_modules``) that cannot be applied; the message names what is wrong."""


@dataclass
class Decision:
    """One promotion to FP32 by the advisor: ``layer`` (module name in the LightningModule), the optimizer
    ``step`` it was taken at, and the loss ``scale`` of the step. The overflow rule: ``where`` the first
    non-finite value appeared (``forward output``, ``backward input-gradient``, ``weight gradient``),
    ``overflows`` counted against the layer within ``window`` steps. The headroom rule (``headroom_bits`` set):
    the FP16 headroom of the layer's ``where`` (``forward output`` or ``output gradient``) stayed below
    ``min_bits`` on ``window`` sampled steps in a row, ``headroom_bits`` at the last one; ``overflows`` is 0."""

    layer: str
    step: int
    where: str
    overflows: int
    window: int
    scale: float
    headroom_bits: float | None = None
    min_bits: float | None = None

    def line(self) -> str:
        if self.headroom_bits is not None:
            return (
                f"step {self.step}: {self.layer} -> FP32 (FP16 headroom of its {self.where} below {self.min_bits:g}"
                f" bits on {self.window} sampled steps in a row, {self.headroom_bits:.2f} bits at the last, loss"
                f" scale {self.scale:g})"
            )
        return (
            f"step {self.step}: {self.layer} -> FP32 ({self.overflows} overflows started in it within {self.window}"
            f" steps, first non-finite value in its {self.where}, loss scale {self.scale:g})"
        )


@dataclass
class PrecisionPlan:
    """``fp32_modules``: module-name globs (``net.vit.blocks.*.attn``) or class names (``SABlock``);
    ``decisions``: the advisor's promotions, in order (their layers are in ``fp32_modules`` too)."""

    fp32_modules: list[str] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"fp32_modules": list(self.fp32_modules), "decisions": [asdict(d) for d in self.decisions]}

    @classmethod
    def from_dict(cls, data: Any, source: str = "plan") -> "PrecisionPlan":
        if not isinstance(data, dict) or set(data) - {"fp32_modules", "decisions"}:
            keys = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise PrecisionPlanError(f"{source}: expected a mapping with fp32_modules and decisions, got {keys}")
        modules = data.get("fp32_modules") or []
        if not isinstance(modules, list) or not all(isinstance(m, str) and m for m in modules):
            raise PrecisionPlanError(f"{source}: fp32_modules must be a list of module-name globs or class names")
        names = [f.name for f in fields(Decision)]
        required = {f.name for f in fields(Decision) if f.default is MISSING}  # plans written before the headroom rule
        decisions = []
        for d in data.get("decisions") or []:
            if not isinstance(d, dict) or not required <= set(d) or not set(d) <= set(names):
                raise PrecisionPlanError(f"{source}: each decision needs the keys {names}, got {d!r}")
            decisions.append(Decision(**d))
        return cls(fp32_modules=list(modules), decisions=decisions)


def plan_file(precision_plan: str | None, plan: str | None = None) -> str | None:
    """The precision plan file a run starts from: `precision.plugin.precision_plan`, or its old name
    `precision.plugin.plan` (a deprecation warning, for one release: the training plan is `plan=`)."""
    if plan is not None:
        logging.getLogger(__name__).warning(
            "precision.plugin.plan is deprecated: use precision.plugin.precision_plan (same file)"
        )
    return precision_plan or plan


def load_plan(path: str | Path) -> PrecisionPlan:
    """Read a ``precision_plan.yaml``; a missing or malformed file is a one-line ``PrecisionPlanError`` naming it."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise PrecisionPlanError(f"precision plan {path}: cannot read it ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        raise PrecisionPlanError(f"precision plan {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    return PrecisionPlan.from_dict(data, source=f"precision plan {path}")


def save_plan(plan: PrecisionPlan, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(plan.to_dict(), sort_keys=False))
    return path


def _matches(pattern: str, name: str, module: nn.Module) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or type(module).__name__ == pattern


def match_modules(root: nn.Module, patterns: Sequence[str], source: str = "fp32_modules") -> list[str]:
    """Names (as in ``root.named_modules()``) of the outermost modules matched by ``patterns`` (globs on the
    names, or class names); their submodules come with them. Patterns that match nothing are a ``PrecisionPlanError``
    naming them, with a few of the names the model has."""
    named = [(n, m) for n, m in root.named_modules() if n]
    unmatched = [p for p in patterns if not any(_matches(p, n, m) for n, m in named)]
    if unmatched:
        sample = ", ".join(n for n, _ in named[:6])
        raise PrecisionPlanError(
            f"{source}: no module of {type(root).__name__} matches {unmatched} (its names: {sample}, ...)"
        )
    chosen = [n for n, m in named if any(_matches(p, n, m) for p in patterns)]
    return outermost(chosen)


def outermost(names: Iterable[str]) -> list[str]:
    """Drop names inside another of the names (``net.a.b`` when ``net.a`` is there), keeping the order."""
    names = list(dict.fromkeys(names))
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]


def saved_fp32_modules(checkpoint: dict) -> list[str]:
    """The `fp32_modules` of the precision plan a `+precision=mixed` run saved in `checkpoint` (its configured
    modules and the advisor's promotions: globs or class names, names as in the LightningModule); [] without one."""
    state = saved_state(checkpoint) or {}
    return PrecisionPlan.from_dict(state.get("plan") or {}, source="checkpoint precision plan").fp32_modules
