"""Whole-volume prediction shared by validation/test (SegmentationModule) and `medseg.predict`."""

import itertools
from collections.abc import Callable, Sequence

import torch
from monai.inferers import sliding_window_inference


def mirror_flips(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of the spatial axes (0, 1, 2 = X, Y, Z), as tensor dims of a (B, C, X, Y, Z) batch; the empty
    subset (no flip) first. Three axes give nnU-Net's 8 mirrored passes."""
    dims = sorted({int(a) + 2 for a in mirror_axes})
    if any(d not in (2, 3, 4) for d in dims):
        raise ValueError(f"must list spatial axes 0, 1 or 2, got {list(mirror_axes)}")
    return [combo for r in range(len(dims) + 1) for combo in itertools.combinations(dims, r)]


@torch.no_grad()
def sliding_window_probs(
    net: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    roi_size: Sequence[int],
    sw_batch_size: int = 4,
    overlap: float = 0.5,
    mode: str = "gaussian",
    mirror_axes: Sequence[int] = (),
) -> torch.Tensor:
    """Class probabilities, float32 (B, C_out, X, Y, Z), for an image (B, C_in, X, Y, Z) of any size.

    Gaussian-blended sliding windows of `roi_size`; with `mirror_axes`, the softmax is averaged over the image
    and its flips along every subset of those axes (test-time mirroring, as nnU-Net predicts).
    """

    def predictor(patch: torch.Tensor) -> torch.Tensor:
        return net(patch).float()

    flips = mirror_flips(mirror_axes)
    total: torch.Tensor | None = None
    for dims in flips:
        view = image.flip(dims) if dims else image
        logits = sliding_window_inference(view, roi_size, sw_batch_size, predictor, overlap=overlap, mode=mode)
        probs = torch.softmax(logits, dim=1)
        probs = probs.flip(dims) if dims else probs
        total = probs if total is None else total + probs
    assert total is not None
    return total / len(flips)
