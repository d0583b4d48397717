"""Where the stitching buffers live during prediction, and how many windows a batch holds. (Which dtype a net
predicts in, and how it is converted: `medseg.precision.dtypes.inference_dtype`,
`medseg.precision.convert.convert_net`.)"""

import ctypes
import ctypes.util
import logging
import math
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)

# Share of free GPU memory the stitching buffers may take before they go to the CPU (see `stitch_device`).
GPU_BUFFER_SHARE = 0.25
# Logits a window batch may hold (classes x window voxels x windows, in the prediction dtype) before it takes fewer
# windows: at 118 classes one 128^3 window's BF16 logits are 495 MB, and the net's last layers hold several such
# tensors (benchmarks/RESULTS.md, "Whole-body scale").
WINDOW_BATCH_BYTES = 2**29

try:  # glibc only: elsewhere there is nothing to call and nothing is done
    _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
except (OSError, AttributeError):
    _malloc_trim = None


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


def window_batch(sw_batch_size: int, num_classes: int, rois: Sequence[Sequence[int]], dtype: torch.dtype) -> int:
    """Windows per batch: `sw_batch_size`, or fewer (at least one) where their logits (`num_classes` channels of
    the largest roi in `dtype`) would take more than `WINDOW_BATCH_BYTES`."""
    per_window = num_classes * max(math.prod(int(s) for s in roi) for roi in rois)
    per_window *= torch.empty((), dtype=dtype).element_size()
    batch = max(1, min(sw_batch_size, WINDOW_BATCH_BYTES // per_window))
    if batch < sw_batch_size:
        log.info("%d window(s) a batch instead of sw_batch_size=%d: %d classes, %.0f MiB of logits a window",
                 batch, sw_batch_size, num_classes, per_window / 2**20)  # fmt: skip
    return batch


def release_freed_memory() -> bool:
    """Hand the C heap's free pages back to the system (glibc's `malloc_trim`); False where there is none.

    Stitching frees sums of a few MB as their tiles leave, between the net's larger allocations, which glibc serves
    from `mmap` instead: the freed sums stay in the heap, unused but resident, and counted in the peak when the
    next forward's activations come (about 430 MiB of 3.5 GB at 118 classes and 1000 slices; benchmarks/RESULTS.md,
    "Whole-body scale")."""
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True
