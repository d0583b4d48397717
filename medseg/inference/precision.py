"""Inference precision: which dtype a net runs and stitches in, and where the stitching buffers live.

The net is converted with the training plugin's own layer casting (`medseg.precision.convert`) and the run's
precision plan, so inference runs exactly the layers the plugin ran in the low dtype (norm layers keep FP32 weights
and statistics; modules the plan keeps in FP32, configured or promoted by the advisor, stay FP32).
"""

import logging
from collections.abc import Sequence

import torch
from torch import nn

from medseg.precision.convert import to_float32, to_low_precision
from medseg.precision.dtypes import DTYPES, auto_low_dtype
from medseg.precision.plan import PrecisionPlan, match_modules
from medseg.precision.state import saved_state

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")  # the names of `dtype=` (medseg.precision.dtypes.DTYPES)
# Share of free GPU memory the stitching buffers may take before they go to the CPU (see `stitch_device`).
GPU_BUFFER_SHARE = 0.25


def inference_dtype(name: str, device: torch.device) -> torch.dtype:
    """`fp32`, `bf16`, `fp16`, or `auto`: fp16 on CUDA, bf16 elsewhere (`medseg.precision.dtypes.auto_low_dtype`)."""
    if name == "auto":
        return auto_low_dtype(device.type)
    if name not in PRECISIONS:
        raise ValueError(f"dtype must be fp32, bf16, fp16 or auto, got {name!r}")
    return DTYPES[name]


def saved_fp32_modules(checkpoint: dict) -> list[str]:
    """The `fp32_modules` of the precision plan a `+precision=mixed` run saved in `checkpoint` (its configured
    modules and the advisor's promotions: globs or class names, names as in the LightningModule); [] without one."""
    state = saved_state(checkpoint) or {}
    return PrecisionPlan.from_dict(state.get("plan") or {}, source="checkpoint precision plan").fp32_modules


def net_fp32_modules(net: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names in `net` of the modules a plan's `patterns` name in the LightningModule, where the net is `net`
    (`SegmentationModule.net`); a `PlanError` naming the patterns that match none of them."""
    if not patterns:
        return []
    holder = nn.Module()
    holder.net = net  # the LightningModule's names, `net.` + the net's own
    names = match_modules(holder, patterns, "precision plan fp32_modules")
    return [n.removeprefix("net").removeprefix(".") for n in names]  # "net" itself: "" (the whole net)


def convert_net(net: nn.Module, dtype: torch.dtype, fp32_modules: Sequence[str] = ()) -> nn.Module:
    """`net` in `dtype`, in place: FP32 as a whole; BF16/FP16 as the training plugin converts it
    (`to_low_precision`), the modules named by `fp32_modules` (a precision plan's patterns, names as in the
    LightningModule: `saved_fp32_modules`) kept in FP32."""
    if dtype == torch.float32:
        return to_float32(net)
    return to_low_precision(net, dtype, fp32_modules=net_fp32_modules(net, fp32_modules))


def stitch_device(
    net_device: torch.device,
    shape: tuple[int, ...],
    num_classes: int,
    dtype: torch.dtype,
    free_bytes: int | None = None,
) -> torch.device:
    """Where MONAI's stitching buffers go for an image of spatial `shape`: beside the net, unless the net is on
    CUDA and the buffers (`num_classes` + 1 channels of `dtype`, times 2 for the softmax'ed copy that mirroring
    or an ensemble keeps) would take more than `GPU_BUFFER_SHARE` of the free GPU memory; then the CPU.

    MONAI moves each window's output to the buffers' device, so the net still runs on the GPU. `free_bytes`:
    the free GPU memory (None: asked from CUDA).
    """
    if net_device.type != "cuda":
        return net_device
    voxels = 1
    for s in shape:
        voxels *= int(s)
    need = 2 * (num_classes + 1) * voxels * torch.empty((), dtype=dtype).element_size()
    free = torch.cuda.mem_get_info(net_device)[0] if free_bytes is None else free_bytes
    if need > GPU_BUFFER_SHARE * free:
        log.info("stitching on the CPU: buffers of %.0f MiB, %.0f MiB free on %s", need / 2**20, free / 2**20,
                 net_device)  # fmt: skip
        return torch.device("cpu")
    return net_device
