"""The precision advisor: on an overflow step, find the module where the first non-finite value appeared, and
decide when a module has caused enough overflows to be kept in FP32 from then on.

How the culprit is found: nothing runs on ordinary steps. When a step's gradients hold inf/NaN, the plugin runs
that batch once more (same weights: the step was skipped) with hooks on every module of the LightningModule that
record, in execution order, whether its inputs and outputs are finite (forward) and whether the gradient reaching
its output, the gradient it passes to its inputs and its own weights' gradients are finite (backward). The culprit
is a module that took finite values and made non-finite ones, the innermost such module, the first in execution
order: forward before backward. Inside a block that has no hooked child doing it (attention logits in
``SABlock``), the block itself is named, since promoting it is what keeps those ops in FP32.
"""

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from lightning_utilities import apply_to_collection
from torch import Tensor, nn

from medseg.precision.dtypes import lost_update_counts
from medseg.precision.headroom import HeadroomRule
from medseg.precision.precision_plan import Decision

_PHASES = ("forward output", "backward input-gradient", "weight gradient")


@dataclass(frozen=True)
class Culprit:
    """The module (name in the LightningModule) where the first non-finite value appeared, and where in it."""

    name: str
    where: str  # one of _PHASES


def _finite(values: Any) -> bool:
    tensors: list[Tensor] = []
    apply_to_collection(values, Tensor, lambda t: tensors.append(t) if t.is_floating_point() else None)
    return all(bool(torch.isfinite(t.detach()).all()) for t in tensors)


class _Trace:
    """Hooks on every named submodule of ``root`` for one forward/backward pass; see the module docstring."""

    def __init__(self, root: nn.Module) -> None:
        self.names = [n for n, _ in root.named_modules() if n]
        self.modules = [m for n, m in root.named_modules() if n]
        self.clock = 0  # one counter for forward and backward events: execution order
        self.forward_bad: dict[int, int] = {}  # module index -> clock, finite inputs made non-finite output
        self.out_grad_bad: set[int] = set()
        self.backward_bad: dict[int, int] = {}  # finite output gradient, non-finite input gradient
        self.out_grad_clock: dict[int, int] = {}
        self._inputs_finite: dict[int, list[bool]] = {}  # a stack per module: a module may call itself
        self._handles: list[Any] = []
        for i, m in enumerate(self.modules):
            self._handles.append(m.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._post(i), with_kwargs=True))

    def _tick(self) -> int:
        self.clock += 1
        return self.clock

    def _pre(self, i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            self._inputs_finite.setdefault(i, []).append(_finite((args, kwargs)))

            # a view of each input, so the gradient this module passes back is its own, not a sum over consumers
            def own(t: Tensor) -> Tensor:
                if not (t.is_floating_point() and t.requires_grad):
                    return t
                view = t.view_as(t)
                view.register_hook(lambda g: self._in_grad(i, g))
                return view

            return apply_to_collection((args, kwargs), Tensor, own)

        return hook

    def _post(self, i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            inputs_finite = self._inputs_finite[i].pop()
            if inputs_finite and not _finite(output):
                self.forward_bad.setdefault(i, self._tick())
            tensors: list[Tensor] = []
            apply_to_collection(output, Tensor, tensors.append)
            for t in tensors:
                if t.is_floating_point() and t.requires_grad:
                    t.register_hook(lambda g: self._out_grad(i, g))

        return hook

    def _out_grad(self, i: int, grad: Tensor) -> None:
        self.out_grad_clock.setdefault(i, self._tick())
        if not bool(torch.isfinite(grad).all()):
            self.out_grad_bad.add(i)

    def _in_grad(self, i: int, grad: Tensor) -> None:
        if i not in self.out_grad_bad and not bool(torch.isfinite(grad).all()):
            self.backward_bad.setdefault(i, self._tick())

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def culprit_key(self) -> int:
        """``phase * 2**40 + clock * 2**20 + module index`` of the culprit (smallest wins, also across ranks), or
        ``2**62`` when nothing non-finite was seen."""
        weights_bad = {
            i: self.out_grad_clock.get(i, 0)
            for i, m in enumerate(self.modules)
            if i not in self.out_grad_bad
            and any(p.grad is not None and not bool(torch.isfinite(p.grad).all()) for p in m.parameters(recurse=False))
        }
        for phase, bad in enumerate((self.forward_bad, self.backward_bad, weights_bad)):
            # innermost: a module whose submodule is also bad only passed on what that submodule made
            inner = [i for i in bad if not any(j != i and self.names[j].startswith(self.names[i] + ".") for j in bad)]
            if inner:
                i = min(inner, key=lambda k: bad[k])
                return phase * 2**40 + bad[i] * 2**20 + i
        return 2**62


def locate(closure: Any, root: nn.Module) -> Culprit | None:
    """Run ``closure`` (the step's forward and backward) with the trace hooks on ``root``'s modules and return
    the culprit; under torch.distributed every rank gets the same answer (the smallest key, all-reduced)."""
    trace = _Trace(root)
    try:
        closure()
    finally:
        trace.remove()
    key = torch.tensor(trace.culprit_key(), dtype=torch.int64)
    if dist.is_available() and dist.is_initialized():
        key = key.to(next(root.parameters()).device)
        dist.all_reduce(key, op=dist.ReduceOp.MIN)
    key_value = int(key.item())
    if key_value >= 2**62:
        return None
    phase, index = key_value // 2**40, key_value % 2**20
    return Culprit(name=trace.names[index], where=_PHASES[phase])


class PrecisionAdvisor:
    """Keeps in FP32 the modules that keep breaking the low dtype.

    Rule: a module is promoted to FP32 once ``overflows`` overflow steps within the last ``window`` optimizer
    steps started in it (see the module docstring for how that is found). A backward overflow (the gradient
    passed back or a weight gradient) counts only when the step's loss scale was at most ``backward_max_scale``:
    above it, halving the scale is the cure, and every FP16 run backs off from its initial scale through a few
    overflows that say nothing about a layer. Forward overflows do not depend on the scale and always count.
    Losses (already FP32) and modules already kept in FP32 are named but never promoted.

    In BF16, where overflows are rare and the risk is updates lost to rounding, every ``lost_update_every``-th
    step records per module the share of its master elements that the step changed but that the low-precision
    weight cannot show (``lost_updates``, logged to the console and W&B; promotion stays the overflow rule's).

    Args:
        overflows: K, overflows started in a module that promote it.
        window: W, the steps over which they are counted.
        backward_max_scale: the largest loss scale at which backward overflows count.
        lost_update_every: sample the per-module lost-update share every n optimizer steps (0: never). It
            copies the low-precision modules' masters once on those steps (the copy ``PrecisionMonitor`` takes
            on its sampled steps, where both sample).
        headroom: the second promotion rule, FP16 only: a layer whose FP16 headroom stays below M bits on W
            sampled steps in a row (``medseg.precision.headroom``); None: overflows only.
    """

    def __init__(
        self,
        overflows: int = 3,
        window: int = 100,
        backward_max_scale: float = 128.0,
        lost_update_every: int = 100,
        headroom: HeadroomRule | None = None,
    ) -> None:
        if overflows < 1 or window < 1 or lost_update_every < 0:
            raise ValueError(
                f"advisor: overflows and window must be >= 1 and lost_update_every >= 0, got {overflows}, {window}"
                f" and {lost_update_every}"
            )
        self.overflows = overflows
        self.window = window
        self.backward_max_scale = backward_max_scale
        self.lost_update_every = lost_update_every
        self.headroom = headroom
        self._seen: dict[str, deque[int]] = {}  # module name -> steps of the overflows it started, in the window
        self.lost_updates: dict[str, float] = {}  # module name -> lost-update share at the last sampled step

    def samples_lost_updates(self, step: int) -> bool:
        return self.lost_update_every > 0 and (step + 1) % self.lost_update_every == 0

    @torch.no_grad()
    def record_lost_updates(
        self, names: list[str], before: list[Tensor], after: list[Tensor], dtype: torch.dtype
    ) -> dict[str, float]:
        """Per module (a parameter name without its last part): of the FP32 master elements this step changed,
        the share whose update would leave the ``dtype`` weight unchanged. ``before``/``after``: FP32 masters."""
        changed: dict[str, Tensor] = {}
        lost: dict[str, Tensor] = {}
        for name, b, a in zip(names, before, after, strict=True):
            module = name.rsplit(".", 1)[0]
            n_moved, n_lost = lost_update_counts(b, a, dtype)
            changed[module] = changed.get(module, 0) + n_moved
            lost[module] = lost.get(module, 0) + n_lost
        counts = torch.stack([torch.stack([changed[m], lost[m]]) for m in changed]).tolist()
        # modules the step did not move (no gradient) have nothing to lose and are left out
        self.lost_updates = {m: n_lost / n for m, (n, n_lost) in zip(changed, counts, strict=True) if n}
        return self.lost_updates

    def record(self, culprit: Culprit, step: int, scale: float) -> Decision | None:
        """Count one overflow started in ``culprit`` at ``step``; the decision when it promotes the module."""
        if culprit.where != _PHASES[0] and scale > self.backward_max_scale:
            return None
        steps = self._seen.setdefault(culprit.name, deque())
        steps.append(step)
        while steps and steps[0] <= step - self.window:
            steps.popleft()
        if len(steps) < self.overflows:
            return None
        del self._seen[culprit.name]
        return Decision(culprit.name, step, culprit.where, len(steps), self.window, float(scale))

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"seen": {name: list(steps) for name, steps in self._seen.items()}}
        if self.headroom is not None:
            state["headroom"] = self.headroom.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._seen = {name: deque(int(s) for s in steps) for name, steps in state.get("seen", {}).items()}
        if self.headroom is not None:
            self.headroom.load_state_dict(state.get("headroom", {}))


def overflow_line(culprit: Culprit | None, step: int, scale: float, nonfinite: Sequence[str] = ()) -> str:
    """The console line for one overflow step; ``nonfinite``: the modules, in the optimizer's parameter order, whose
    gradients in the step itself held inf/NaN, named when the re-run does not reproduce the overflow (a kernel that
    is not deterministic, say). An inf made in one module's backward reaches every module before it, so the line
    names the last ones: in a net registered in forward order, those nearest the output, where it started."""
    if culprit is None:
        line = f"precision advisor: step {step} overflowed (scale {scale:g}), not reproduced when re-run"
        if nonfinite:
            last = ", ".join(reversed(nonfinite[-3:]))
            line += f"; non-finite gradients in the step itself in {len(nonfinite)} module(s), the last: {last}"
        return line
    where = f"first non-finite {culprit.where} in {culprit.name}"
    return f"precision advisor: step {step} overflowed (scale {scale:g}): {where}"
