"""Per-class Dice of label maps from voxel counts: no (B, C, X, Y, Z) one-hot, no loop over classes.

MONAI's DiceMetric takes one-hot predictions and targets: two dense float copies of C channels per volume (a
96^3 volume with 105 classes: 740 MB; a whole-body CT with 118 classes: tens of GB). The same numbers come from
three `bincount`s of the label maps: intersection, predicted and true voxels per class.
"""

import torch
from monai.metrics.utils import do_metric_reduction
from monai.utils import convert_to_tensor


def class_dice(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, C - 1) float32 Dice of classes 1..C-1 per case; NaN where the target lacks the class, as MONAI's
    DiceMetric(include_background=False, ignore_empty=True) gives. `pred`, `target`: (B, 1, X, Y, Z) or
    (B, X, Y, Z) class indices (any integer or float dtype holding whole numbers)."""
    # plain tensors: a MetaTensor label would make the logged Dice a MetaTensor, which a checkpoint then pickles
    pred, target = (convert_to_tensor(t, track_meta=False) for t in (pred, target))
    b = pred.shape[0]
    pred, target = pred.reshape(b, -1).long(), target.reshape(b, -1).long()
    offset = torch.arange(b, device=pred.device)[:, None] * num_classes  # one bincount for the whole batch

    def counts(index: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        flat = torch.bincount(index.reshape(-1), weights=weights, minlength=b * num_classes)
        return flat.reshape(b, num_classes).float()

    both = counts(target + offset, (pred == target).reshape(-1).float())
    predicted, true = counts(pred + offset), counts(target + offset)
    dice = torch.where(true > 0, 2 * both / (predicted + true).clamp_min(1), torch.nan)
    return dice[:, 1:]


class ClassDice:
    """DiceMetric(include_background=False, reduction="mean_batch")'s `__call__`/`aggregate()`/`reset()` on
    label maps: per class, the mean over the cases seen since `reset()` whose target has the class."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.cases: list[torch.Tensor] = []

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        dice = class_dice(pred, target, self.num_classes)
        self.cases.append(dice)
        return dice

    def aggregate(self) -> torch.Tensor:
        """(C - 1,) float32; MONAI's own reduction, so a class in no target is 0.0, as DiceMetric gives."""
        return do_metric_reduction(torch.cat(self.cases), "mean_batch")[0]

    def reset(self) -> None:
        self.cases = []
