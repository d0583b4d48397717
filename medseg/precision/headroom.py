"""The advisor's headroom rule: promote, before it overflows, a layer whose FP16 values keep coming close to 65504.

It reads what ``PrecisionMonitor`` already measures on its sampled steps (every ``every_n_steps``-th step, with
``layer_stats``: each weighted leaf layer's forward-output abs-max and the abs-max of the scaled gradient reaching
that output) and adds nothing to the other steps. FP16 headroom is ``log2(65504 / abs-max)``. For the output
gradient the loss scale is taken out down to ``backward_max_scale``: above that scale a gradient close to the limit
is the scaler's to cure (it halves), so the headroom counted is the one the gradient would have at
``min(step scale, backward_max_scale)``.

What promotion cures: the layer's weights, compute, weight gradient and the gradient it passes back become FP32
(the sums over voxels where an output gradient close to the limit overflows). Its output is still handed on in the
low dtype at its boundary, so a forward output that keeps growing past 65504 overflows all the same; for that,
keep the enclosing block in FP32 (``fp32_modules``) or bring the input down.
"""

import math

import torch
import torch.distributed as dist

from medseg.precision.dtypes import headroom_bits
from medseg.precision.precision_plan import Decision


def reduce_max(values: list[float]) -> list[float]:
    """Element-wise max over the ranks under torch.distributed, so that every rank takes the same decisions."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


class HeadroomRule:
    """Promote a layer once the FP16 headroom of its forward output or of its output gradient has stayed below
    ``bits`` on ``samples`` sampled steps in a row (see the module docstring). Sampled steps that overflowed are
    the overflow rule's: they neither extend nor break a run of low headroom.

    Args:
        bits: M, the headroom (powers of two below 65504) under which a sample counts.
        samples: W, the consecutive sampled steps it must count on.
    """

    def __init__(self, bits: float = 2.0, samples: int = 3) -> None:
        if samples < 1 or not bits > 0:
            raise ValueError(f"advisor.headroom: bits must be > 0 and samples >= 1, got {bits} and {samples}")
        self.bits = bits
        self.samples = samples
        self._streaks: dict[str, int] = {}  # layer -> sampled steps in a row with headroom below `bits`

    def observe(
        self,
        step: int,
        acts: dict[str, float],
        out_grads: dict[str, float],
        scale: float,
        backward_max_scale: float,
        skip: set[str],
    ) -> list[Decision]:
        """Count one sampled step: ``acts``/``out_grads`` are abs-maxes by layer (output gradients scaled by
        ``scale``; a layer missing there had no gradient); layers in ``skip`` (already FP32) are not counted.
        Returns the decisions, in layer order, for the layers whose run reached ``samples``."""
        names = [n for n in acts if n not in skip]
        # -1: no gradient reached that output (abs-maxes are >= 0, and NaN would not survive the max over ranks)
        both = reduce_max([acts[n] for n in names] + [out_grads.get(n, -1.0) for n in names])
        grad_scale = min(scale, backward_max_scale) / scale
        decisions = []
        for name, act, grad in zip(names, both[: len(names)], both[len(names) :], strict=True):
            act_bits = headroom_bits(act)
            grad_bits = headroom_bits(grad * grad_scale) if grad >= 0 else math.inf
            low = min(act_bits, grad_bits)
            if low >= self.bits:
                self._streaks.pop(name, None)
                continue
            self._streaks[name] = self._streaks.get(name, 0) + 1
            if self._streaks[name] < self.samples:
                continue
            del self._streaks[name]
            where = "forward output" if act_bits <= grad_bits else "output gradient"
            decisions.append(Decision(name, step, where, 0, self.samples, scale, headroom_bits=low, min_bits=self.bits))
        return decisions

    def state_dict(self) -> dict[str, int]:
        return dict(self._streaks)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._streaks = {name: int(n) for name, n in state.items()}
