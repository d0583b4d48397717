"""Where MONAI's attention blocks fail in FP16, and whether FP32 logits + softmax (medseg's default) fix it.

    python benchmarks/attention_fp16.py [--gains 1 10 30 60 100 300 1000]

One block at a time, as conf/model/unetr.yaml and swinunetr.yaml build them: UNETR's ``SABlock`` (hidden 96,
4 heads of 24, 64 tokens: a 64^3 patch) and SwinUNETR's first-stage ``WindowAttention`` (12 channels, 3 heads of
4, a 4^3 window). Input: N(0, 1) tokens (what the LayerNorm in front of each block hands on); the query and key rows
of the ``qkv`` projection are multiplied by ``gain``, so the logits grow with gain^2 (attention-logit growth, as in
a long run). Per gain: the largest |logit| (after MONAI's scaling, FP32 reference), and the FP16 block's output,
plain and with ``attention_in_fp32``: finite or not, and its largest error against the FP32 block.
"""

import argparse
import copy

import torch
from monai.networks.blocks import SABlock
from monai.networks.nets.swin_unetr import WindowAttention
from torch import nn

from medseg.precision.attention import attention_in_fp32
from medseg.tracking.tables import markdown_table


def blocks() -> dict[str, tuple[nn.Module, int, float]]:
    """name -> (FP32 block, channels of q (= of k), MONAI's logit scale)."""
    torch.manual_seed(0)
    sa = SABlock(hidden_size=96, num_heads=4)
    window = WindowAttention(dim=12, num_heads=3, window_size=(4, 4, 4), qkv_bias=True)
    return {"SABlock 96/4 (UNETR)": (sa, 96, sa.scale), "WindowAttention 12/3 (SwinUNETR)": (window, 12, window.scale)}


def logits(block: nn.Module, x: torch.Tensor, channels: int, scale: float) -> torch.Tensor:
    """The block's attention logits in FP32 (relative position bias left out: it is ~0.02 at initialisation)."""
    heads = block.num_heads
    q, k, _ = block.qkv(x).unflatten(-1, (3, heads, channels // heads)).permute(2, 0, 3, 1, 4)
    return (q @ k.transpose(-2, -1)) * scale


def run(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return block(x) if isinstance(block, SABlock) else block(x, None)


def measure(gains: list[float]) -> list[dict]:
    rows = []
    for name, (base, channels, scale) in blocks().items():
        x = torch.randn(2, 64, channels, generator=torch.Generator().manual_seed(1))
        for gain in gains:
            block = copy.deepcopy(base)
            with torch.no_grad():
                block.qkv.weight[: 2 * channels] *= gain  # query and key rows
                ref = run(block, x)
                row = {
                    "block": name,
                    "q/k gain": gain,
                    "max logit": logits(block, x, channels, scale).abs().max().item(),
                }
                plain = copy.deepcopy(block).half()
                op_level = copy.deepcopy(block).half()
                attention_in_fp32(op_level)
                for label, low in (("fp16", plain), ("fp16 + fp32 logits", op_level)):
                    out = run(low, x.half()).float()
                    finite = bool(torch.isfinite(out).all())
                    row[f"{label} finite"] = "yes" if finite else "NO"
                    row[f"{label} max err"] = (out - ref).abs().max().item() if finite else float("nan")
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gains", type=float, nargs="+", default=[1, 10, 30, 60, 100, 300, 1000])
    args = parser.parse_args(argv)
    rows = measure(args.gains)
    print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    main()
