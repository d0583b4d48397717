"""The planner's memory model against real peak memory, and the fp32 vs `mixed` plans at one memory budget.

    python benchmarks/plan_memory.py                                   # DynUNet, 1 channel, 3 classes, CPU
    python benchmarks/plan_memory.py --patch 48 --classes 3 40 118     # the C-channel logits, softmax and loss
    python benchmarks/plan_memory.py --patch 32 48 64 --batch 2 --dataset ../shared/data/Task04_Hippocampus \
        --budget 600M

Part 1, per patch and dtype: the planner's count (`medseg.planning.memory.step_cost`, meta device, no compute)
beside the peak memory of real training steps (`medseg.planning.measure.measure_steps`, the net laid out as
training lays it out) run in a fresh process each: on CUDA `torch.cuda.max_memory_allocated`; on a CPU the
process's peak resident memory (ru_maxrss) less its resident memory just before the net was built, which also
counts allocator slack and oneDNN scratch buffers.
Part 2 (with --dataset): the fp32 and `mixed` plans at the same --budget, and the peak of each plan's step.
"""

import argparse
import json
import os
import resource
import subprocess
import sys

import torch

from medseg.models.dynunet import kernels_and_strides
from medseg.planning.memory import step_cost
from medseg.planning.planner import filters_for, low_dtype
from medseg.tracking.tables import markdown_table

MIB = 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(spec: dict) -> dict:
    """One configuration, in this (fresh) process: the measured peak of two real steps."""
    from medseg.planning.measure import measure_steps

    dtype = getattr(torch, spec["dtype"]) if spec["dtype"] else None
    before = _rss()
    measured = measure_steps(
        spec["in_channels"], spec["classes"], spec["patch"], spec["spacing"], spec["filters"], spec["batch"], dtype,
        spec["device"], steps=1,
    )  # fmt: skip
    if measured.peak is not None:
        return {"peak": measured.peak, "seconds": measured.seconds}
    return {"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before, "seconds": measured.seconds}


def measure_in_fresh_process(spec: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def row(in_channels: int, classes: int, patch, spacing, batch: int, precision: str, device: str) -> dict:
    dtype = low_dtype(precision, device)
    filters = filters_for(len(kernels_and_strides(patch, spacing)[1]), device)
    model = step_cost(in_channels, classes, patch, spacing, filters, dtype).bytes(batch)
    spec = dict(in_channels=in_channels, classes=classes, patch=list(patch), spacing=list(spacing), filters=filters,
                batch=batch, dtype=str(dtype).removeprefix("torch.") if dtype else None, device=device)  # fmt: skip
    real = measure_in_fresh_process(spec)
    return {
        "patch": "x".join(map(str, patch)), "batch": batch, "precision": precision,
        "model MiB": model / MIB, "measured MiB": real["peak"] / MIB, "measured / model": real["peak"] / model,
        "step s": real["seconds"],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patch", nargs="+", type=int, default=[32, 48, 64])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--classes", nargs="+", type=int, default=[3], help="output classes, background included")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "mixed"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dataset", default=None, help="an MSD folder for part 2")
    parser.add_argument("--budget", default="600M", help="part 2's memory budget")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return []
    rows = [
        {"classes": classes, **row(1, classes, [p, p, p], [1.0, 1.0, 1.0], args.batch, precision, args.device)}
        for classes in args.classes
        for p in args.patch
        for precision in args.precisions
    ]
    print(f"DynUNet (planner's filters), 1 channel, {args.device}: step memory, model vs measured")
    print(markdown_table(rows))
    if args.dataset:
        from medseg.planning.auto import plan_dataset
        from medseg.planning.fingerprint import read_fingerprint

        fp, plans = read_fingerprint(args.dataset), []
        for precision in args.precisions:
            plan = plan_dataset(args.dataset, precision, memory=args.budget, device=args.device, measure=False)
            real = row(len(fp.modalities), fp.num_classes, plan.patch, plan.spacing, plan.batch, precision, args.device)
            plans.append({"precision": precision, **real, "budget MiB": plan.budget.memory / MIB})
        print(f"\nPlans for {args.dataset} at a {args.budget} budget, and the measured peak of each plan's step")
        print(markdown_table(plans))
        rows += plans
    return rows


if __name__ == "__main__":
    main()
