"""ONNX export of a trained net, checked with ONNX Runtime on the CPU against the PyTorch net.

torch.onnx's dynamo exporter (torch 2.13; needs onnxscript) with every axis but the channels dynamic: batch and
the three spatial sizes. The bundle runs it through `scripts/runtime.py`'s `OnnxNetwork`.
"""

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.export import Dim

# Largest difference allowed between ONNX Runtime's logits and PyTorch's (FP32 both; reassociated sums differ in
# the last bits: 3.6e-6 measured on the tiny U-Net of tests/test_export.py).
ATOL = 1e-4


def to_onnx(net: nn.Module, example: torch.Tensor, path: Path, opset: int | None = None) -> Path:
    """Write `net` (eval mode, FP32) to `path` with input `image` (B, C_in, X, Y, Z) and output `logits`
    (B, C_out, X, Y, Z). Raises ValueError when ONNX Runtime's logits differ from the net's by more than ATOL on
    `example` or on a larger, odd-sized input."""
    dynamic = {"x": {0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO, 4: Dim.AUTO}}
    torch.onnx.export(net, (example,), str(path), input_names=["image"], output_names=["logits"], dynamo=True,
                      dynamic_shapes=dynamic, opset_version=opset, verbose=False)  # fmt: skip
    bigger = torch.randn(1, example.shape[1], *(s + 8 for s in example.shape[2:]), generator=torch.Generator())
    for x in (example, bigger):
        diff = float(np.abs(run_onnx(path, x) - net(x).detach().numpy()).max())
        if not diff <= ATOL:
            raise ValueError(f"ONNX Runtime's logits differ from PyTorch's by {diff:.2e} (> {ATOL}), input {x.shape}")
    return path


def run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    """Logits of the ONNX model at `path` for `x`, by ONNX Runtime on the CPU."""
    import onnxruntime  # optional dependency (the `export` extra)

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x.numpy()})[0]
