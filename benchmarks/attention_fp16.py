"""Where MONAI's attention blocks fail in FP16, and whether FP32 logits + softmax (medseg's default) fix it.

    python benchmarks/attention_fp16.py [--gains 1 10 30 60 100 300 1000]
    python benchmarks/attention_fp16.py --runs <run dir> [<run dir> ...] [--volumes 8]

One block at a time, as conf/model/unetr.yaml and swinunetr.yaml build them: UNETR's ``SABlock`` (hidden 96,
4 heads of 24, 64 tokens: a 64^3 patch) and SwinUNETR's first-stage ``WindowAttention`` (12 channels, 3 heads of
4, a 4^3 window). Input: N(0, 1) tokens (what the LayerNorm in front of each block hands on); the query and key rows
of the ``qkv`` projection are multiplied by ``gain``, so the logits grow with gain^2 (attention-logit growth, as in
a long run). Per gain: the largest |logit| (after MONAI's scaling, FP32 reference), and the FP16 block's output,
plain and with ``attention_in_fp32``: finite or not, and its largest error against the FP32 block.

``--runs``: the same largest |logit| in trained nets instead, where FP16 would need it to stay: the best checkpoint
of each medseg run directory (UNETR or SwinUNETR, FP32 master weights), on a centre patch of its first
validation volumes, every attention block hooked. FP16 overflows where the product it computes passes 65504:
SABlock scales after q.k^T (limit 65504 x scale on the scaled logit), WindowAttention before (limit 65504).
"""

import argparse
import copy
import math
from pathlib import Path

import torch
from hydra.utils import instantiate
from monai.networks.blocks import SABlock
from monai.networks.nets.swin_unetr import WindowAttention
from omegaconf import OmegaConf
from torch import nn

from medseg.checkpoint import CheckpointError, best_checkpoint, fp32_net_state, load_checkpoint
from medseg.precision.attention import attention_in_fp32
from medseg.precision.dtypes import FP16_MAX
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


def trained(run: Path, volumes: int) -> dict:
    """Largest |attention logit| of `run`'s best checkpoint on centre patches of `volumes` validation volumes."""
    try:
        ckpt_path = best_checkpoint(run)
    except CheckpointError:  # a run stopped before it saved one
        return {"run": f"{run.parent.name}/{run.name}", "checkpoint": "none saved"}
    ckpt = load_checkpoint(ckpt_path)
    net = instantiate(ckpt["hyper_parameters"]["inference"]["net"])
    net.load_state_dict(fp32_net_state(ckpt))
    net.eval()
    data = instantiate(OmegaConf.load(run / ".hydra" / "config.yaml").data)
    data.setup("validate")
    patch = list(ckpt["hyper_parameters"]["roi_size"])
    found: dict[str, float] = {}  # block kind -> largest |logit|
    limits = {}

    def hook(block: nn.Module, args: tuple) -> None:
        kind = type(block).__name__
        channels = block.qkv.in_features
        top = logits(block, args[0].float(), channels, block.scale).abs().max().item()
        found[kind] = max(found.get(kind, 0.0), top)
        limits[kind] = FP16_MAX * block.scale if isinstance(block, SABlock) else FP16_MAX

    for module in net.modules():
        if isinstance(module, SABlock | WindowAttention):
            module.register_forward_pre_hook(hook)
    with torch.no_grad():
        for i, batch in enumerate(data.val_dataloader()):
            if i == volumes:
                break
            image = batch["image"].as_tensor() if hasattr(batch["image"], "as_tensor") else batch["image"]
            starts = [(s - p) // 2 for s, p in zip(image.shape[2:], patch, strict=True)]
            net(image[:, :, *[slice(a, a + p) for a, p in zip(starts, patch, strict=True)]])
    kind = next(iter(found))
    return {
        "run": f"{run.parent.name}/{run.name}",
        "checkpoint": ckpt_path.name,
        "block": kind,
        "max abs logit": found[kind],
        "FP16 limit": limits[kind],
        "headroom bits": math.log2(limits[kind] / found[kind]),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gains", type=float, nargs="+", default=[1, 10, 30, 60, 100, 300, 1000])
    parser.add_argument("--runs", type=Path, nargs="+", help="medseg run directories of UNETR or SwinUNETR")
    parser.add_argument("--volumes", type=int, default=8, help="--runs: validation volumes to run")
    args = parser.parse_args(argv)
    rows = [trained(run, args.volumes) for run in args.runs] if args.runs else measure(args.gains)
    columns = ["run", "checkpoint", "block", "max abs logit", "FP16 limit", "headroom bits"] if args.runs else None
    print(markdown_table(rows, columns))
    return rows


if __name__ == "__main__":
    main()
