"""Whole-volume prediction shared by validation/test (SegmentationModule) and `medseg.predict`."""

import itertools
from collections.abc import Callable, Sequence

import torch
from monai.inferers import sliding_window_inference

# Whole-volume work (softmax, argmax) runs on slabs of this many X planes: a 512 x 512 x 256 volume never gets a
# second full-size float copy of its C class channels, nor an int64 argmax (8 bytes a voxel, twice float32's size).
SLAB = 16


def mirror_flips(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of the spatial axes (0, 1, 2 = X, Y, Z), as tensor dims of a (B, C, X, Y, Z) batch; the empty
    subset (no flip) first. Three axes give nnU-Net's 8 mirrored passes."""
    dims = sorted({int(a) + 2 for a in mirror_axes})
    if any(d not in (2, 3, 4) for d in dims):
        raise ValueError(f"must list spatial axes 0, 1 or 2, got {list(mirror_axes)}")
    return [combo for r in range(len(dims) + 1) for combo in itertools.combinations(dims, r)]


def softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 1 of (B, C, X, ...) in place, computed in float32 one slab of X planes at a time."""
    for slab in logits.split(SLAB, dim=2):
        slab.copy_(torch.softmax(slab.float(), dim=1))
    return logits


def probs_to_labels(probs: torch.Tensor) -> torch.Tensor:
    """uint8 class indices (B, 1, X, Y, Z) of the most probable class of probs (B, C, X, Y, Z), slab by slab."""
    labels = torch.empty((probs.shape[0], 1, *probs.shape[2:]), dtype=torch.uint8, device=probs.device)
    for start in range(0, probs.shape[2], SLAB):
        stop = start + SLAB
        labels[:, :, start:stop] = probs[:, :, start:stop].argmax(1, keepdim=True)
    return labels


@torch.no_grad()
def sliding_window_probs(
    net: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    roi_size: Sequence[int],
    sw_batch_size: int = 4,
    overlap: float = 0.5,
    mode: str = "gaussian",
    mirror_axes: Sequence[int] = (),
    dtype: torch.dtype | None = None,
    sw_device: torch.device | str | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Class probabilities (B, C_out, X, Y, Z) for an image (B, C_in, X, Y, Z) of any size.

    Gaussian-blended sliding windows of `roi_size`; with `mirror_axes`, the softmax is averaged over the image
    and its flips along every subset of those axes (test-time mirroring, as nnU-Net predicts).

    Args:
        dtype: the windows fed to `net` (which must hold that dtype, e.g. converted by
            `medseg.precision.convert.convert_net`), MONAI's stitching buffers (they take the dtype of the
            image passed to it) and the returned probabilities. None: windows and buffers in the image's dtype,
            probabilities float32 (how validation runs under the training precision plugin).
        sw_device: where the windows go through `net` (None: the image's device).
        device: where the stitching buffers and the result live (None: the image's device); `cpu` with a CUDA
            `sw_device` keeps a full-size volume's buffers out of GPU memory.
    """
    out_dtype = dtype or torch.float32
    # a plain tensor: for a MetaTensor input MONAI converts its result to an empty MetaTensor's float32
    image = image.as_tensor() if hasattr(image, "as_tensor") else image
    if dtype is not None:
        image = image.to(dtype)

    def predictor(patch: torch.Tensor) -> torch.Tensor:
        return net(patch).to(patch.dtype)

    flips = mirror_flips(mirror_axes)
    total: torch.Tensor | None = None
    for dims in flips:
        view = image.flip(dims) if dims else image
        logits = sliding_window_inference(
            view, roi_size, sw_batch_size, predictor, overlap=overlap, mode=mode, sw_device=sw_device, device=device
        )
        probs = softmax_(logits).to(out_dtype)
        probs = probs.flip(dims) if dims else probs
        total = probs if total is None else total.add_(probs)
    assert total is not None
    return total.div_(len(flips)) if len(flips) > 1 else total
