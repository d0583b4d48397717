"""What a training step keeps for backward: the net's saved activations vs the FP32 loss's, per dtype.

    python benchmarks/saved_memory.py --patch 96 128 --batch 2

Counts the bytes of every tensor autograd saves (unique storages, `torch.autograd.graph.saved_tensors_hooks`)
during the net's forward in FP32 and in the low dtype (as the plugin runs it: low-precision weights and
activations, FP32 norm parameters), and during the loss, which medseg computes in FP32 in every mode. Saved bytes
do not depend on the device, so this CPU run shows the structure of the GPU's activation memory: the loss part is
the same in every precision and pulls the `mixed`/fp32 peak-memory ratio towards 1.
"""

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))  # a folder of scripts: the sibling script, also when imported
from precision import LABEL_NAMES, build_module, synthetic_batches  # noqa: E402


def saved_mib(fn) -> tuple[torch.Tensor, float]:
    """Runs `fn()`; returns its result and the MiB of distinct storages autograd saved for backward meanwhile."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    return out, sum(storages.values()) / 2**20


def to_low_dtype(net: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The net as `MixedPrecision.convert_module` leaves it: low-precision weights, FP32 norm parameters."""
    from medseg.precision.plugin import NORM_TYPES

    net.to(dtype)
    for module in net.modules():
        if isinstance(module, NORM_TYPES):
            module.float()
    return net


def measure(model: str, patch: int, batch: int, dtype: torch.dtype) -> dict[str, float]:
    module = build_module(model, patch)
    net = module.net.train() if dtype == torch.float32 else to_low_dtype(module.net.train(), dtype)
    data = synthetic_batches(1, batch, patch, seed=0, device="cpu", channels_last=False)[0]
    logits, net_mib = saved_mib(lambda: net(data["image"].to(dtype)))
    _, loss_mib = saved_mib(lambda: module.compute_loss(logits, data["label"]))
    return {"net": net_mib, "loss": loss_mib}


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patch", nargs="+", type=int, default=[96, 128])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--model", default="unet", choices=["unet", "dynunet"])
    # same bytes either way; bfloat16 because FP16 convolutions crawl on CPUs
    parser.add_argument("--low", default="bfloat16", choices=["float16", "bfloat16"])
    args = parser.parse_args(argv)
    low = getattr(torch, args.low)
    print(f"{args.model}, batch {args.batch}, {len(LABEL_NAMES)} classes; saved for backward, MiB")
    print("| patch | fp32 net | fp32 loss | low net | low loss | loss share (low) | low/fp32 | low/fp32 without loss |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for patch in args.patch:
        torch.manual_seed(0)
        fp32 = measure(args.model, patch, args.batch, torch.float32)
        half = measure(args.model, patch, args.batch, low)
        total32, total16 = fp32["net"] + fp32["loss"], half["net"] + half["loss"]
        print(
            f"| {patch}^3 | {fp32['net']:.0f} | {fp32['loss']:.0f} | {half['net']:.0f} | {half['loss']:.0f} | "
            f"{half['loss'] / total16:.0%} | {total16 / total32:.2f} | {half['net'] / fp32['net']:.2f} |"
        )
        row = {"fp32_net": fp32["net"], "fp32_loss": fp32["loss"], "low_net": half["net"], "low_loss": half["loss"]}
        rows.append({"patch": patch, **row})
    return rows


if __name__ == "__main__":
    main()
