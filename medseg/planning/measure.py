"""A few real training steps at plan time: the step time the training length is computed from, and on CUDA
the peak memory that checks the meta-device count (`medseg.planning.memory`)."""

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from medseg.models.channels_last import to_channels_last
from medseg.models.loss import deep_supervision_loss, planned_loss
from medseg.planning.nets import DYNUNET, PlannedNet
from medseg.precision.convert import to_low_precision

WARMUP = 2  # untimed steps: on a CPU the second step was still slower than the ones after it
# A measurement stops early once its steps took this long (after at least one untimed and one timed step): a step
# of 100+ classes at a large patch takes 10-30 s on a CPU, and 6 of them per measured plan made planning minutes.
MAX_SECONDS = 15.0


@dataclass(frozen=True)
class Measured:
    """Seconds of the median forward+backward+AdamW step (not the fastest: the training length follows from it,
    and a run planned from its fastest step outruns `max_time` before its LR schedule ends); peak bytes allocated
    on CUDA (None on CPU)."""

    seconds: float
    peak: int | None


def measure_steps(
    in_channels: int,
    num_classes: int,
    patch: Sequence[int],
    spacing: Sequence[float],
    filters: Sequence[int],
    batch: int,
    low_dtype: torch.dtype | None,
    device: str = "cpu",
    steps: int = 4,
    net: PlannedNet = DYNUNET,
    max_seconds: float = MAX_SECONDS,
) -> Measured:
    """Times `steps` steps after WARMUP untimed ones on random data, with the net laid out as training lays it out
    (channels-last on CPU, the low dtype with FP32 norms); fewer once the steps took `max_seconds` (at least one
    untimed and one timed). Raises torch.OutOfMemoryError when it does not fit."""
    torch.manual_seed(0)
    net = net.build(in_channels, num_classes, patch, spacing, filters).to(device)
    if device == "cpu":
        to_channels_last(net)
    if low_dtype is not None:
        to_low_precision(net, low_dtype)
    loss = planned_loss()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    image = torch.randn(batch, in_channels, *patch, device=device, dtype=low_dtype or torch.float32)
    if device == "cpu":
        image = image.contiguous(memory_format=torch.channels_last_3d)
    label = torch.randint(0, num_classes, (batch, 1, *patch), device=device).float()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times: list[float] = []
    while len(times) < steps + WARMUP and not (len(times) >= 2 and sum(times) > max_seconds):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        deep_supervision_loss(loss, net(image), label).backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return Measured(float(np.median(times[min(WARMUP, len(times) - 1) :])), peak)
