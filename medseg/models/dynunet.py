"""nnU-Net's rule for a DynUNet's kernels and strides, from patch size and voxel spacing."""

from collections.abc import Sequence

from monai.networks.nets import DynUNet


def nnunet_filters(num_levels: int, base: int = 32) -> list[int]:
    """nnU-Net's widths per level: ``base``, 2x, 4x, ... capped at 320."""
    return [min(base * 2**i, 320) for i in range(num_levels)]


def kernels_and_strides(
    patch_size: Sequence[int], spacing: Sequence[float], min_size: int = 4
) -> tuple[list[list[int]], list[list[int]]]:
    """Halve an axis while its feature map stays >= 2 * min_size and its spacing is at most twice the finest;
    use a 1-wide kernel on axes still much coarser than the others (anisotropic scans), as nnU-Net does."""
    sizes, spacings = list(patch_size), list(spacing)
    strides, kernels = [[1, 1, 1]], []
    while True:
        finest = min(spacings)
        kernels.append([3 if s / finest <= 2 else 1 for s in spacings])
        stride = [2 if (s / finest <= 2 and n >= 2 * min_size) else 1 for s, n in zip(spacings, sizes, strict=True)]
        if all(s == 1 for s in stride) or len(strides) >= 6:
            break
        sizes = [n // s for n, s in zip(sizes, stride, strict=True)]
        spacings = [sp * s for sp, s in zip(spacings, stride, strict=True)]
        strides.append(stride)
    return kernels, strides


def build_dynunet(
    in_channels: int,
    out_channels: int,
    patch_size: Sequence[int],
    spacing: Sequence[float],
    filters: Sequence[int] | None = None,
    deep_supervision: bool = True,
    deep_supr_num: int = 2,
    norm_name: str = "instance",
    res_block: bool = False,
) -> DynUNet:
    """A DynUNet sized for `patch_size` at `spacing`; `filters` defaults to nnU-Net's 32, 64, ... capped at 320.

    In training mode with deep supervision it returns (B, 1 + deep_supr_num, C, *patch) logits,
    in eval mode (B, C, *patch).
    """
    kernels, strides = kernels_and_strides(patch_size, spacing)
    filters = list(filters) if filters else nnunet_filters(len(strides))
    deep_supr_num = min(deep_supr_num, len(strides) - 2)
    return DynUNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernels,
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=filters[: len(strides)],
        norm_name=norm_name,
        deep_supervision=deep_supervision,
        deep_supr_num=deep_supr_num,
        res_block=res_block,
    )
