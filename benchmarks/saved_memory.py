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

from medseg.precision.plugin import MasterWeightPrecision
from medseg.tracking.tables import markdown_table

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


def measure(model: str, patch: int, batch: int, low: str | None) -> dict[str, float]:
    """Saved MiB of the net's forward and of the loss; `low` None for FP32, else the plugin's dtype name."""
    module = build_module(model, patch)
    net = module.net.train()
    data = synthetic_batches(1, batch, patch, seed=0, device="cpu", channels_last=False)[0]
    image = data["image"]
    if low is not None:  # the net and batch exactly as the plugin converts them
        plugin = MasterWeightPrecision(dtype=low)
        net = plugin.convert_module(net)
        image = plugin.convert_input(image)
    logits, net_mib = saved_mib(lambda: net(image))
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
    print(f"{args.model}, batch {args.batch}, {len(LABEL_NAMES)} classes; saved for backward, MiB")
    rows, cells = [], []
    for patch in args.patch:
        torch.manual_seed(0)
        fp32 = measure(args.model, patch, args.batch, None)
        half = measure(args.model, patch, args.batch, args.low)
        total32, total16 = fp32["net"] + fp32["loss"], half["net"] + half["loss"]
        cells.append({
            "patch": f"{patch}^3", "fp32 net": f"{fp32['net']:.0f}", "fp32 loss": f"{fp32['loss']:.0f}",
            "low net": f"{half['net']:.0f}", "low loss": f"{half['loss']:.0f}",
            "loss share (low)": f"{half['loss'] / total16:.0%}", "low/fp32": f"{total16 / total32:.2f}",
            "low/fp32 without loss": f"{half['net'] / fp32['net']:.2f}",
        })  # fmt: skip
        row = {"fp32_net": fp32["net"], "fp32_loss": fp32["loss"], "low_net": half["net"], "low_loss": half["loss"]}
        rows.append({"patch": patch, **row})
    print(markdown_table(cells))
    return rows


if __name__ == "__main__":
    main()
