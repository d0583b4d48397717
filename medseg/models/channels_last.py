"""Channels-last 3D (NDHWC) nets whose instance norms keep that layout.

aten's ``instance_norm`` views its input as (1, N*C, D, H, W) for ``batch_norm``, which only works on NCDHW: given
an NDHWC tensor it makes an NCDHW copy and returns NCDHW, and the next convolution (NDHWC weights) converts back,
in the forward and again in the backward pass, a measurable share of a CPU step (benchmarks/HISTORY.md, "CPU, third
session"). Batch norm over one sample at a time is the same instance norm, and oneDNN/ATen run it on NDHWC
directly and its output stays NDHWC. That pays for large activations, whose NCDHW copy is a cache-unfriendly
transpose; on small ones, which stay in cache, torch's copy is cheap and the per-sample kernel slower, hence
`MIN_BYTES` (both measured there).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Activations smaller than this (whole batch) take torch's path. Measured on a 2-core Zen 4 (benchmarks/RESULTS.md).
MIN_BYTES = 8 * 2**20


class ChannelsLastInstanceNorm3d(nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` that normalises a large NDHWC CPU input without leaving that layout.

    Same parameters, state-dict keys and results (to rounding) as its parent, which it falls back to for
    anything else: inputs under `MIN_BYTES`, NCDHW input, CUDA tensors (not measured there) and running
    statistics (batch norm per sample would update them once per sample).
    """

    def forward(self, input: Tensor) -> Tensor:
        """(N, C, D, H, W) in any float dtype -> same shape, dtype and memory format."""
        if not self._keeps_layout(input):
            return super().forward(input)
        samples = [
            F.batch_norm(sample, None, None, self.weight, self.bias, training=True, eps=self.eps)
            for sample in input.split(1)
        ]
        return torch.cat(samples)

    def _keeps_layout(self, input: Tensor) -> bool:
        return (
            input.dim() == 5
            and input.device.type == "cpu"
            and input.numel() * input.element_size() >= MIN_BYTES
            and not self.track_running_stats
            and input.is_contiguous(memory_format=torch.channels_last_3d)
            and not input.is_contiguous()
        )


def to_channels_last(net: nn.Module) -> nn.Module:
    """Put `net`'s weights in ``torch.channels_last_3d`` and make its ``nn.InstanceNorm3d`` layers
    ``ChannelsLastInstanceNorm3d`` (in place: a class swap, so parameters, hooks and checkpoint keys stay)."""
    net.to(memory_format=torch.channels_last_3d)
    for module in net.modules():
        if type(module) is nn.InstanceNorm3d:
            module.__class__ = ChannelsLastInstanceNorm3d
    return net
