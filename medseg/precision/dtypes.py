"""Dtype facts, each stated once: the names medseg accepts for a dtype, which low dtype `auto` means, FP16's range
and the headroom below it, and the share of master updates a low-precision weight cannot show.

A leaf: no medseg imports, no Lightning; the plugin, the monitor, the advisor, inference, planning and tracking all
import it.
"""

import math

import torch
from torch import Tensor

# Every dtype name in medseg's options to its torch dtype: the plugin's `dtype` (float16, bfloat16), `medseg.predict
# dtype=` and `model.test_dtype` (fp32, bf16, fp16), and the number in Lightning's precision strings ("16-mixed",
# "bf16-true", "32-true": the part before the dash).
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
LOW_DTYPES = (torch.float16, torch.bfloat16)
FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504


def auto_low_dtype(device_type: str) -> torch.dtype:
    """What `dtype: auto` means on a device: float16 on CUDA (tensor cores), bfloat16 elsewhere (CPUs have no fast
    FP16 kernels, benchmarks/RESULTS.md "Precision advisor, transformer U-Nets, FP16 attention"; BF16 is the CPU's
    fast low dtype)."""
    return torch.float16 if device_type == "cuda" else torch.bfloat16


def inference_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype of `medseg.predict dtype=` and `model.test_dtype`: `fp32`, `bf16`, `fp16`, or `auto`
    (`auto_low_dtype` of the device)."""
    if name == "auto":
        return auto_low_dtype(device.type)
    if name not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"dtype must be fp32, bf16, fp16 or auto, got {name!r}")
    return DTYPES[name]


def accumulation_dtype(name: str, window_dtype: torch.dtype) -> torch.dtype:
    """The dtype of `medseg.predict sum_dtype=`, the sliding windows' sums: `fp32`, `bf16`, `fp16`, or `auto`:
    float16 for BF16 windows (eight times finer rounding in the same memory, nnU-Net's choice; benchmarks/RESULTS.md,
    "Whole-body scale"), else the windows' own dtype."""
    if name == "auto":
        return torch.float16 if window_dtype == torch.bfloat16 else window_dtype
    if name not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"sum_dtype must be fp32, bf16, fp16 or auto, got {name!r}")
    return DTYPES[name]


def lightning_low_dtype(precision: str) -> torch.dtype | None:
    """The low dtype of a Lightning precision string (``"16-mixed"``, ``"bf16-true"``...); None for FP32/64."""
    dtype = DTYPES.get(str(precision).split("-")[0])
    return dtype if dtype in LOW_DTYPES else None


def headroom_bits(absmax: float) -> float:
    """``log2(65504 / absmax)``: how many doublings are left before FP16 overflows (inf past the limit: -inf)."""
    if not math.isfinite(absmax):
        return -math.inf
    return math.log2(FP16_MAX / absmax) if absmax > 0 else math.inf


def lost_update_counts(before: Tensor, after: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Of the FP32 master elements one optimizer step moved from ``before`` to ``after`` (same shape), how many
    moved and how many of those a ``dtype`` weight would not show: ``round(round(before) + delta) == round(before)``
    in ``dtype``, i.e. the same update applied to the low-precision weight leaves it unchanged. Two 0-dim int64
    tensors on the masters' device (no host sync)."""
    start = before.to(dtype)
    moved = after != before
    kept = (start.float() + (after - before)).to(dtype) == start
    return moved.sum(), (moved & kept).sum()
