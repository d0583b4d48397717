"""MONAI dictionary pipelines on {"image", "label"}: nnU-Net-style preprocessing, then patch sampling and augmentation.

`preprocess` is deterministic and cached; `augment` runs every epoch on the cached output.
"""

from collections.abc import Sequence

import torch
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)


def _nonzero(x):
    return x != 0


def normalize(modality: str, ct_window: Sequence[float] = (-1000.0, 1000.0)) -> list:
    """CT: clip to a HU window and scale to [0, 1]. Anything else (MRI sequences): z-score per channel over
    nonzero voxels, which makes the hippocampus scans (max 112 to 1.7e6) comparable."""
    if modality.upper() == "CT":
        lo, hi = ct_window
        return [ScaleIntensityRanged("image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)]
    return [NormalizeIntensityd("image", nonzero=True, channel_wise=True)]


def preprocess(
    spacing: Sequence[float],
    modality: str,
    patch_size: Sequence[int],
    ct_window: Sequence[float] = (-1000.0, 1000.0),
    with_label: bool = True,
    crop_foreground: bool = True,
) -> Compose:
    """Load -> channels first (MSD 4D images are channels-last) -> RAS -> target spacing -> crop to the
    nonzero region -> normalise -> pad to at least one patch.

    Output: image float32 (C, X, Y, Z); label float32 (1, X, Y, Z) holding class indices.
    Every step is invertible, so predictions can be mapped back to the input's own grid.
    """
    keys = ["image", "label"] if with_label else ["image"]
    modes = ["bilinear", "nearest"] if with_label else ["bilinear"]
    steps = [
        LoadImaged(keys, image_only=True),
        EnsureChannelFirstd(keys),
        Orientationd(keys, axcodes="RAS"),
        # resampled in float32 (MONAI's default is float64): at 512 x 512 x 1000 its float64 copy and grid peaked
        # at 6.1 GB (benchmarks/RESULTS.md, "Whole-body scale")
        Spacingd(keys, pixdim=tuple(spacing), mode=modes, dtype=torch.float32),
    ]
    if crop_foreground:
        # Before normalisation: z-scored intensities are negative inside the body, raw zeros are not.
        # no start/end coordinate keys: numpy arrays beside tensors break batch collation; Invertd does not need them
        steps.append(
            CropForegroundd(
                keys,
                source_key="image",
                select_fn=_nonzero,
                allow_smaller=True,
                start_coord_key=None,
                end_coord_key=None,
            )
        )
    steps += [
        *normalize(modality, ct_window),
        SpatialPadd(keys, spatial_size=tuple(patch_size)),
        EnsureTyped(keys, track_meta=True),
    ]
    return Compose(steps)


def augment(
    patch_size: Sequence[int],
    *,
    num_samples: int,
    pos: float,
    neg: float,
    flip_axes: Sequence[int],
    affine_prob: float,
    intensity_prob: float,
) -> Compose:
    """Random patches (foreground-centred `pos / (pos + neg)` of the time, as nnU-Net oversamples foreground),
    then nnU-Net-like spatial and intensity augmentation. Output patches: image (C, *patch_size). The settings'
    defaults live in one place, `MSDDataModule` (the `data.*` keys)."""
    keys = ["image", "label"]
    return Compose(
        [
            RandCropByPosNegLabeld(
                keys,
                label_key="label",
                spatial_size=tuple(patch_size),
                pos=pos,
                neg=neg,
                num_samples=num_samples,
            ),
            RandAffined(
                keys,
                prob=affine_prob,
                rotate_range=(0.26, 0.26, 0.26),
                scale_range=(0.15, 0.15, 0.15),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            *[RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in flip_axes],
            RandGaussianNoised("image", prob=intensity_prob, std=0.1),
            RandGaussianSmoothd(
                "image", prob=intensity_prob, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)
            ),
            RandScaleIntensityd("image", factors=0.25, prob=intensity_prob),
            RandShiftIntensityd("image", offsets=0.1, prob=intensity_prob),
            RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=intensity_prob),
            # Plain float32 tensors: some random transforms hand back numpy arrays, and training needs no meta.
            EnsureTyped(keys, dtype=torch.float32, track_meta=False),
        ]
    )
