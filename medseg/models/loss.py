"""The training loss as a plain function of logits and labels, usable without a Trainer: SegmentationModule trains
with it and the planner counts and times it (nnU-Net's ``DeepSupervisionWrapper`` idea)."""

from collections.abc import Callable

import torch
from monai.losses import DiceCELoss

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def planned_loss() -> DiceCELoss:
    """The loss a planned run is counted with: batch Dice + cross-entropy on softmax'ed logits (nnU-Net's)."""
    return DiceCELoss(to_onehot_y=True, softmax=True, batch=True)


def deep_supervision_loss(loss: Loss, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``loss`` in FP32 whatever the logits' dtype (a Dice sum over a 3D patch overflows FP16).

    Args:
        loss: called as ``loss(logits float32 (B, C, X, Y, Z), labels)``.
        logits: (B, C, X, Y, Z), or with deep supervision (B, S, C, X, Y, Z), head 0 at full resolution; heads
            are weighted 1, 1/2, 1/4... as in nnU-Net and the sum divided by the weights' sum.
        labels: (B, 1, X, Y, Z) class indices.
    """
    if logits.ndim == labels.ndim + 1:
        weights = [0.5**i for i in range(logits.shape[1])]
        total = sum(w * loss(logits[:, i].float(), labels) for i, w in enumerate(weights))
        return total / sum(weights)
    return loss(logits.float(), labels)
