"""Whole-body scale, training side (issue 22): step memory against classes, a many-class plan against its own
budget, and start-up time against case count, first start vs second.

    python benchmarks/scale_train.py --smoke                         # every table at toy sizes (~2 min, no claims)
    python benchmarks/scale_train.py                                 # the real tables (alone on the machine)

Table 1 (per class count): the planner's memory count (`step_cost`) beside the peak RSS of real DynUNet training
steps in a fresh process (benchmarks/plan_memory.py's measurement), at --patch and batch 2, `mixed` (BF16 on CPU).
Table 2 (per class count, --plan-classes): a TotalSegmentator-like folder (`medseg.data.synthetic.write_ct_dataset`,
--plan-cases cases of --plan-shape), `python -m medseg.plan` timed with its peak RSS, then `python -m medseg.train`
from that plan for --train-epochs epochs with its peak RSS, against the plan's own per-step estimate and budget.
Table 3 (per case count): start-up of `medseg.train`'s data side (dataset checks, headers, split, and the
persistent cache made for every case lacking one) in a fresh process, on a new cache folder and again on the same
one ("second made": cache files the second start had to make, 0 when the cache is reused whole); the cache's
size, and what zlib level 1 would save on it and cost per case read (`compression`).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from medseg.data.synthetic import write_ct_dataset
from medseg.tracking.tables import markdown_table

sys.path.insert(0, str(Path(__file__).parent))  # a folder of scripts: the sibling script, also when imported
from plan_memory import row as step_row  # noqa: E402

MIB = 2**20


def _timed(cmd: list[str]) -> tuple[float, float, str]:
    """Seconds and peak RSS (MiB, GNU time's %M) of a child process; its standard output."""
    start = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB %M", *cmd], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    peak_kb = int(out.stderr.rsplit("MAXRSS_KB ", 1)[1].split()[0])
    return time.perf_counter() - start, peak_kb / 1024, out.stdout


def plan_and_train(work: Path, classes: int, cases: int, shape: list[int], epochs: int, time_budget: str) -> dict:
    root = write_ct_dataset(work / f"Task_ct{classes}", num_cases=cases, num_classes=classes, shape=tuple(shape))
    plan_path = work / f"plan_{classes}.yaml"
    plan_cmd = [sys.executable, "-m", "medseg.plan", str(root), "--precision", "mixed", "--time-budget", time_budget]
    plan_s, plan_peak, _ = _timed([*plan_cmd, "--out", str(plan_path)])
    plan = yaml.safe_load(plan_path.read_text())
    header = plan_path.read_text()
    estimate = float(header.split("# memory: ")[1].split(" GiB")[0]) * 1024
    budget = float(header.split(" GiB budget")[0].rsplit(" of a ", 1)[1]) * 1024
    train_s, train_peak, _ = _timed([
        sys.executable, "-m", "medseg.train", f"plan={plan_path}", "+precision=mixed", "logger=csv", "test=false",
        f"trainer.max_epochs={epochs}", "trainer.enable_progress_bar=false", "++callbacks.progress_bar=null",
        f"data.cache_dir={work / 'cache'}", f"paths.log_dir={work / 'logs'}",
    ])  # fmt: skip
    return {
        "classes": classes, "patch": "x".join(map(str, plan["data"]["patch_size"])),
        "batch": plan["data"]["batch_size"],
        "plan s": plan_s, "plan peak MiB": plan_peak, "step estimate MiB": estimate, "budget MiB": budget,
        "train s": train_s, "train peak MiB": train_peak, "train peak inside budget": train_peak <= budget,
    }  # fmt: skip


def startup_child(root: str, cache: str) -> dict:
    """In a fresh process: the data module as `medseg.train` builds it (dataset checks, headers, split), then the
    persistent cache made for every case that lacks one (MONAI's own file name for it); a cached case is left for
    the first epoch to read, as training does."""
    from medseg.data.datamodule import MSDDataModule

    start = time.perf_counter()
    dm = MSDDataModule(root, patch_size=(16, 16, 16), cache_dir=cache, num_workers=2, num_samples=1)
    checked = time.perf_counter() - start
    dm.setup()
    made = 0
    for dataset in (dm.val_set, dm.train_set):
        for item in dataset.data:
            name = dataset.hash_func(item).decode("utf-8") + dataset.transform_hash
            if not (dataset.cache_dir / f"{name}.pt").is_file():
                dataset._cachecheck(item)  # MONAI's cache-filling step for one item
                made += 1
    return {"checks s": checked, "total s": time.perf_counter() - start, "cached": made}


def compression(cache: Path, sample: int = 20) -> dict:
    """Whether compressing the persistent cache would pay: its size, and for up to `sample` of its files zlib
    level 1's ratio and the seconds to read a file plain (torch.load) vs decompress and load it."""
    import io
    import zlib

    import torch

    files = sorted(cache.rglob("*.pt"))
    size = sum(f.stat().st_size for f in files)
    plain = packed = read_plain = read_packed = 0.0
    for f in files[:sample]:
        raw = f.read_bytes()
        start = time.perf_counter()
        torch.load(io.BytesIO(raw), weights_only=False)
        read_plain += time.perf_counter() - start
        small = zlib.compress(raw, 1)
        start = time.perf_counter()
        torch.load(io.BytesIO(zlib.decompress(small)), weights_only=False)
        read_packed += time.perf_counter() - start
        plain, packed = plain + len(raw), packed + len(small)
    n = max(1, min(sample, len(files)))
    return {
        "cache MiB": size / MIB, "zlib-1 size": packed / max(plain, 1),
        "load ms": 1000 * read_plain / n, "load zlib-1 ms": 1000 * read_packed / n,
    }  # fmt: skip


def startup(work: Path, cases: int, shape: list[int], classes: int) -> dict:
    root = write_ct_dataset(work / f"Task_n{cases}", num_cases=cases, num_classes=classes, shape=tuple(shape))
    cache = work / f"cache_n{cases}"
    cmd = [sys.executable, __file__, "--startup-child", str(root), str(cache)]
    first = json.loads(_timed(cmd)[2].strip().splitlines()[-1])
    second = json.loads(_timed(cmd)[2].strip().splitlines()[-1])
    return {
        "cases": cases, "first s": first["total s"], "first checks s": first["checks s"],
        "second s": second["total s"], "second checks s": second["checks s"], "second made": second["cached"],
        "second / first": second["total s"] / first["total s"], **compression(cache),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="toy sizes: checks the script runs, measures nothing")
    parser.add_argument("--classes", nargs="+", type=int, default=[3, 26, 118])
    parser.add_argument("--patch", nargs="+", type=int, default=[48, 64])
    parser.add_argument("--plan-classes", nargs="+", type=int, default=[3, 26, 118])
    parser.add_argument("--plan-cases", type=int, default=6)
    parser.add_argument("--plan-shape", nargs=3, type=int, default=[96, 96, 96])
    parser.add_argument("--train-epochs", type=int, default=2)
    parser.add_argument("--time-budget", default="30m")
    parser.add_argument("--cases", nargs="+", type=int, default=[50, 200, 1000])
    parser.add_argument("--case-shape", nargs=3, type=int, default=[48, 48, 48])
    parser.add_argument("--tables", nargs="+", type=int, default=[1, 2, 3], help="which tables to make")
    parser.add_argument("--work", type=Path, default=Path("/tmp/medseg_scale_train"))
    parser.add_argument("--startup-child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.startup_child:
        print(json.dumps(startup_child(*args.startup_child)))
        return
    if args.smoke:
        args.classes, args.patch, args.plan_classes, args.plan_cases = [3, 26], [24], [26], 3
        args.plan_shape, args.train_epochs, args.time_budget = [40, 40, 32], 1, "2m"
        args.cases, args.case_shape = [12, 24], [24, 24, 24]
    args.work.mkdir(parents=True, exist_ok=True)
    if 1 in args.tables:
        steps = [
            {"classes": c, **step_row(1, c, [p] * 3, [1.0] * 3, 2, "mixed", "cpu")}
            for c in args.classes
            for p in args.patch
        ]
        print("Training step memory against classes (DynUNet, planner's filters, batch 2, mixed, CPU)")
        print(markdown_table(steps))
    if 2 in args.tables:
        plans = [
            plan_and_train(args.work, c, args.plan_cases, args.plan_shape, args.train_epochs, args.time_budget)
            for c in args.plan_classes
        ]
        print(f"\nPlanning and training a {args.plan_cases}-case {'x'.join(map(str, args.plan_shape))} CT folder")
        print(markdown_table(plans))
    if 3 in args.tables:
        starts = [startup(args.work, n, args.case_shape, 26) for n in args.cases]
        print(f"\nStart-up against case count ({'x'.join(map(str, args.case_shape))} CT, 26 classes, 2 workers)")
        print(markdown_table(starts))


if __name__ == "__main__":
    main()
