"""Learning-rate schedules stepped per optimizer step: linear warm-up, then cosine or nnU-Net's poly decay."""

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_decay(
    optimizer: torch.optim.Optimizer,
    total_steps: int | Callable[[], int],
    warmup_steps: int = 0,
    kind: str = "cosine",
    power: float = 0.9,
    min_factor: float = 0.0,
) -> LambdaLR:
    """LR factor rises linearly over `warmup_steps`, then decays to `min_factor` at `total_steps`:
    cosine, or poly `(1 - t) ** power` (nnU-Net uses power 0.9).

    `total_steps` may be a function, called once, at the first step past the warm-up: SegmentationModule passes
    `trainer.estimated_stepping_batches` that way, because reading it while the optimizer is built makes Lightning
    build the train loader before it has restored the checkpoint's loader state, and an epoch-bounded resume would
    then restart its epoch from the first batch (issue 26).
    """
    if kind not in ("cosine", "poly", "constant"):
        raise ValueError(f"model.scheduler.kind must be 'cosine', 'poly' or 'constant', got {kind!r}")
    length: list[int] = [] if callable(total_steps) else [max(int(total_steps), 1)]

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if step == warmup_steps:
            return 1.0  # t = 0 whatever the length, so it is not read yet
        if not length:
            length.append(max(int(total_steps()), 1))  # type: ignore[operator]
        t = min((step - warmup_steps) / max(length[0] - warmup_steps, 1), 1.0)
        if kind == "cosine":
            decay = 0.5 * (1 + math.cos(math.pi * t))
        elif kind == "poly":
            decay = (1 - t) ** power
        else:
            decay = 1.0
        return min_factor + (1 - min_factor) * decay

    return LambdaLR(optimizer, factor)
