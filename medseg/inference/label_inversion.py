"""A predicted label map back onto the input's own voxel grid, in memory that does not grow with the input's length.

MONAI's `Invertd` resamples the whole map at once through `grid_sample`, whose float32 sampling grid holds three
coordinates for every output voxel: 3.1 GB for a 512 x 512 x 1000 CT, beside 1 GB of float32 labels, so the
inversion alone outgrew the prediction (7.8 GB peak at 118 classes; benchmarks/RESULTS.md, "Whole-body scale").
Here MONAI still undoes everything after the resampling (padding, cropping: the net's grid) and before it
(orientation: integer labels, no interpolation); the resampling itself is MONAI's `SpatialResample`, called with the
recorded settings for `PLANES` output planes at a time along the longest axis, each turned into integer labels
before the next.
"""

from copy import deepcopy

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Spacingd, SpatialResample
from monai.transforms.utils import convert_applied_interp_mode
from monai.utils import TraceKeys
from monai.utils.type_conversion import get_torch_dtype_from_string

# Output planes resampled at a time: at 512 x 512, 64 planes are 200 MB of sampling grid.
PLANES = 64


def _undo(steps: list, voxels: torch.Tensor, meta: dict, operations: list) -> MetaTensor:
    """`steps` (dictionary transforms of key "image", as `Invertd` calls them) undone on `voxels` (C, X, Y, Z)
    that carry the image's `meta` and its records `operations` (the last ones those of `steps`)."""
    image = MetaTensor(voxels, meta=deepcopy(meta), applied_operations=deepcopy(operations))
    return Compose(steps).inverse({"image": image})["image"]


def _resample_record(operations: list) -> int:
    """Index of the last resampling record (`Spacingd`'s) among `operations`."""
    found = [i for i, op in enumerate(operations) if op[TraceKeys.CLASS_NAME] == SpatialResample.__name__]
    if not found:
        raise ValueError("the image was not resampled (no SpatialResample record): nothing to invert plane-wise")
    return found[-1]


def invert_labels(labels: torch.Tensor, record: MetaTensor, transform: Compose, planes: int = PLANES) -> np.ndarray:
    """Class indices (1, X, Y, Z) on the net's grid -> (X', Y', Z') on the input's grid, nearest neighbour, in
    the labels' dtype (uint8 or int16).

    Args:
        labels: integer class indices of the preprocessed image.
        record: the preprocessed image (its voxels may be gone): its meta and applied operations.
        transform: the preprocessing that made `record`, a `Compose` holding one `Spacingd`.
    """
    steps = list(transform.transforms)
    at = next(i for i, t in enumerate(steps) if isinstance(t, Spacingd))
    operations = convert_applied_interp_mode(record.applied_operations, mode="nearest", align_corners=None)
    cut = _resample_record(operations)
    # 1. padding and cropping, undone on the net's grid (float32 for MONAI's pad/crop inverses)
    grid = _undo(steps[at + 1 :], labels.float(), dict(record.meta), operations)
    # 2. the resampling, PLANES output planes at a time, as SpatialResample.inverse would make them all at once
    resample = operations[cut]
    info = dict(resample[TraceKeys.EXTRA_INFO])
    align = info["align_corners"]
    resampler = SpatialResample(
        mode=info["mode"],
        padding_mode=info["padding_mode"],
        align_corners=False if align == TraceKeys.NONE else align,
        dtype=get_torch_dtype_from_string(info["dtype"]),
    )
    dst_affine = torch.as_tensor(info["src_affine"], dtype=torch.float64)
    size = [int(s) for s in resample[TraceKeys.ORIG_SIZE]]
    axis = max(range(3), key=lambda a: (size[a], -a))
    out = torch.empty((1, *size), dtype=labels.dtype)
    source = MetaTensor(grid.as_tensor(), affine=grid.affine)
    del grid
    for start in range(0, size[axis], planes):
        part_size = list(size)
        part_size[axis] = min(planes, size[axis] - start)
        shift = torch.eye(4, dtype=torch.float64)
        shift[axis, 3] = start
        with resampler.trace_transform(False):
            part = resampler(source, dst_affine=dst_affine @ shift, spatial_size=part_size)
        region = [slice(None)] * 4
        region[1 + axis] = slice(start, start + part_size[axis])
        out[tuple(region)] = part.as_tensor().round_().to(labels.dtype)
    del source
    # 3. orientation (and anything else before the resampling), undone on the integer labels
    meta = {**record.meta, "affine": dst_affine, "spatial_shape": np.asarray(size)}
    return np.asarray(_undo(steps[:at], out, meta, operations[:cut])[0])
