"""TorchScript of a trained net: scripted where the net scripts, traced where it does not.

Scripting keeps the net's control flow; tracing records one pass at the patch size, the only input size sliding
windows feed it. With MONAI 1.6, UNet, SegResNet and UNETR script; DynUNet ("Arguments for call are not valid")
and SwinUNETR (Project-MONAI/MONAI #6823) are traced (tests/test_export.py). Every module is checked against the
net on two batch sizes, since a sliding window's last batch may hold fewer windows.
"""

import copy
import logging
from collections.abc import Sequence

import torch
from torch import nn

from medseg.precision.convert import convert_net

log = logging.getLogger(__name__)
# Largest difference allowed between the TorchScript module's logits and the eager net's on the same input.
ATOL = 1e-4


def to_torchscript(net: nn.Module, example: torch.Tensor) -> tuple[torch.jit.ScriptModule, str]:
    """(module, "script" or "trace") for an eval-mode FP32 `net`; `example`: a (B, C_in, *patch) batch, B >= 2.
    Raises ValueError when the module's output differs from the net's on `example` or on its first item."""
    try:
        module, how = torch.jit.script(net), "script"
    except Exception as err:  # torch.jit raises many types; the net's own code decides which
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        log.info("%s does not script (%s); tracing it", type(net).__name__, reason)
        module, how = torch.jit.trace(net, example, check_trace=False), "trace"
    with torch.no_grad():
        for batch in (example, example[:1]):
            diff = (module(batch) - net(batch)).abs().max().item()
            if not diff <= ATOL:
                raise ValueError(
                    f"the {how}d {type(net).__name__} differs from the net by {diff:.2e} (> {ATOL}) on a batch of "
                    f"{batch.shape[0]}"
                )
    return module, how


class LowPrecisionNet(nn.Module):
    """`net` computing in BF16/FP16 (the modules of its precision plan kept in FP32, as `medseg.predict dtype=bf16`
    converts it) behind an FP32 interface: (B, C_in, *patch) float32 in, (B, C, *patch) float32 logits out, so the
    bundle's inferer, sums and argmax stay as they are."""

    def __init__(self, net: nn.Module, dtype: torch.dtype, fp32_modules: Sequence[str] = ()) -> None:
        super().__init__()
        self.net = convert_net(copy.deepcopy(net), dtype, fp32_modules).eval()
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.to(self.dtype)).float()
