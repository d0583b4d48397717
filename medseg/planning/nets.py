"""The net a plan is made for: the DynUNet that nnU-Net's rules size (`model=dynunet`, the default), or the model
the user chose (`model=unet|segresnet|unetr|swinunetr`), taken as its conf/model file builds it.

For a chosen model the plan keeps the net as configured and plans spacing, patch and batch around it: a patch the
net can take (every side a multiple of its downsampling factor; SwinUNETR also more than one bottleneck voxel, the
rule `medseg.config_check` enforces before training) and the memory of that net, counted on the meta device.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from hydra.utils import get_class
from torch import nn

from medseg.config_check import TRANSFORMER_FACTORS, ConfigError
from medseg.models.dynunet import build_dynunet, kernels_and_strides


def _downsampling(node: dict) -> int:
    """Every patch side must be a multiple of this for `node`'s net (a `model.net` config with `_target_`)."""
    name = str(node["_target_"]).rsplit(".", 1)[-1]
    if name in TRANSFORMER_FACTORS:
        return TRANSFORMER_FACTORS[name]
    if name == "UNet":
        return math.prod(int(s) for s in node.get("strides", [2, 2, 2]))
    if name == "SegResNet":  # one halving per down block after the first; skips are added, so sizes must match
        return 2 ** (len(node.get("blocks_down", [1, 2, 2, 4])) - 1)
    known = ", ".join(["DynUNet", "UNet", "SegResNet", *TRANSFORMER_FACTORS])
    raise ConfigError(f"plan: cannot plan for model.net._target_={node['_target_']} (it plans {known})")


@dataclass(frozen=True)
class PlannedNet:
    """Args:
    name: the conf/model choice the plan file names (`override /model: <name>`).
    node: that model's `model.net` config (plain dict, `_target_` and its options); None plans a DynUNet whose
        kernels, strides and filters follow the patch (nnU-Net's rules).
    """

    name: str = "dynunet"
    node: dict | None = field(default=None, compare=False)

    @property
    def is_dynunet(self) -> bool:
        return self.node is None

    @property
    def min_axis(self) -> int:
        """Smallest patch side: one DynUNet halving down to its 4-voxel bottleneck, else one downsampling factor."""
        return 8 if self.node is None else _downsampling(self.node)

    def factors(self, patch: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
        """(3,) every patch side must be a multiple of its factor: the DynUNet's stride product for this patch,
        else the chosen net's fixed downsampling factor."""
        if self.node is None:
            _, strides = kernels_and_strides(list(patch), list(spacing))
            return np.prod(np.asarray(strides), axis=0)
        return np.full(3, _downsampling(self.node))

    def takes(self, patch: Sequence[int], spacing: Sequence[float]) -> bool:
        """Whether the net trains on `patch`: the DynUNet 3 levels deep (deep supervision needs two halvings),
        SwinUNETR more than one voxel at its bottleneck (its instance norm fails on one); all sides multiples."""
        patch = np.asarray(patch)
        if (patch % self.factors(patch, spacing)).any() or (patch < self.min_axis).any():
            return False
        if self.node is None:
            return len(kernels_and_strides(patch.tolist(), list(spacing))[1]) >= 3
        if str(self.node["_target_"]).endswith("SwinUNETR"):
            return int(np.prod(patch // self.min_axis)) >= 2
        return True

    def build(
        self, in_channels: int, num_classes: int, patch: Sequence[int], spacing: Sequence[float], filters
    ) -> nn.Module:
        """The net in training mode. Under `torch.device("meta")` a net whose constructor reads a value back
        (SwinUNETR's drop-path rates: `.item()`) is built on the CPU and then moved to the meta device."""
        if self.node is None:
            return build_dynunet(in_channels, num_classes, list(patch), list(spacing), filters=filters).train()
        kwargs = {k: v for k, v in self.node.items() if not k.startswith("_")}
        kwargs.update(in_channels=in_channels, out_channels=num_classes)
        if "img_size" in kwargs:  # UNETR's position embeddings are made for the training patch
            kwargs["img_size"] = list(patch)
        cls = get_class(self.node["_target_"])
        try:
            return cls(**kwargs).train()
        except RuntimeError:
            if torch.empty(0).device.type != "meta":
                raise
        with torch.device("cpu"):
            return cls(**kwargs).train().to("meta")


DYNUNET = PlannedNet()
