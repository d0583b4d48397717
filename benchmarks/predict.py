"""Prediction benchmark: fp32 vs low-precision inference (time, peak memory, Dice), folder throughput, ensembles.

    python benchmarks/predict.py sizes --repeat 2                 # time + peak memory per volume size, fp32 vs bf16
    python benchmarks/predict.py sizes --sizes 128 512x512x256    # only these sizes
    python benchmarks/predict.py folder --ckpt RUN --images DIR   # cases/s on a folder, precision x workers
    python benchmarks/predict.py dice --run RUN                   # Dice of fp32 vs bf16 on the run's validation split
    python benchmarks/predict.py ensemble --runs FOLDER --cases test_cases.json   # each fold vs the ensemble

`sizes`: each (size, mode, repeat) runs in a fresh process, interleaved (every mode of a size, then the next size,
then the next repeat), so the modes share the machine's load; reported is the fastest run and the smallest peak.
One run = `sliding_window_probs` (gaussian blending) + `probs_to_labels` on a preprocessed image (random float32,
1 channel), by the UNet of conf/model/unet.yaml (3 classes, random weights, seed 0): the part of prediction that
precision changes. Loading, resampling and writing are left out (they are the same in every precision and run in
the DataLoader's workers); `folder` times them all. The image goes to the net as `medseg.predict` hands it over
(`net_input`: cast, and the FP32 voxels released). Peak memory: the process's peak RSS (`ru_maxrss`) above its RSS
before the FP32 image was made (net built, warm-up on one window run), so the image counts; CUDA:
`max_memory_allocated`. `--sizes 128 512x512x256` runs only those sizes (N: a cube).
The ROI is `--roi` cubed, or for a smaller volume its shape rounded up to a multiple of 8 (35 x 50 x 35 ->
40 x 56 x 40, the hippocampus preset's patch).
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medseg.tracking.tables import markdown_table

REPO_ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
        return f"{name}, {os.cpu_count()} CPUs"
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def vm_rss_mib(field: str = "VmRSS") -> float:
    """A memory field of /proc/self/status in MiB: `VmRSS` (resident now) or `VmHWM` (peak resident); nan elsewhere."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load_avg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def parse_size(text: str) -> tuple[int, int, int]:
    """`XxYxZ`, or `N` for a cube."""
    try:
        size = tuple(int(s) for s in text.lower().split("x"))
    except ValueError:
        size = ()
    size = size * 3 if len(size) == 1 else size
    if len(size) != 3 or min(size) < 1:
        raise argparse.ArgumentTypeError(f"a size is XxYxZ or N (a cube), got {text!r}")
    return size  # type: ignore[return-value]


def roi_for(size: tuple[int, ...], roi: int) -> tuple[int, ...]:
    if all(s >= roi for s in size):
        return (roi,) * 3
    return tuple(min(roi, -(-s // 8) * 8) for s in size)


def unet_node(num_classes: int = 3):
    """conf/model/unet.yaml's net for 1 input channel and `num_classes` classes (its `_target_` node)."""
    from omegaconf import OmegaConf

    node = OmegaConf.load(REPO_ROOT / "conf" / "model" / "unet.yaml").net
    node.in_channels, node.out_channels = 1, num_classes
    return node


def unet(num_classes: int = 3) -> torch.nn.Module:
    from hydra.utils import instantiate

    torch.manual_seed(0)
    return instantiate(unet_node(num_classes)).eval()


def one_run(size: tuple[int, int, int], mode: str, roi: int, overlap: float, sw_batch: int, device: str) -> dict:
    """Worker: one timed prediction of a random volume; returns seconds and peak MiB above the start."""
    from monai.data import MetaTensor

    from medseg.inference.predictor import net_input
    from medseg.models.sliding_window import probs_to_labels, sliding_window_probs
    from medseg.precision.convert import convert_net

    dev = torch.device(device)
    dtype = DTYPES[mode]
    net = convert_net(unet().to(dev), dtype)
    window = roi_for(size, roi)

    def run(shape: tuple[int, ...]) -> torch.Tensor:
        # the preprocessed image as the DataLoader hands it over: float32 on the CPU
        x = net_input({"image": MetaTensor(torch.randn(1, *shape))}, dtype, dev)
        probs = sliding_window_probs(net, x, window, sw_batch, overlap, dtype=dtype)
        del x
        return probs_to_labels(probs)

    # the baseline before the warm-up: the allocator keeps what the warm-up freed, and the real run needs it too
    base_rss = vm_rss_mib()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    run(window)  # kernels chosen and loaded
    if dev.type == "cuda":
        torch.cuda.synchronize()
    torch.manual_seed(1)
    start = time.perf_counter()
    labels = run(size)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if dev.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss
    return {"seconds": seconds, "peak_mib": peak, "foreground": float((labels > 0).float().mean())}


def sizes(args: argparse.Namespace) -> list[dict]:
    runs: dict[tuple, list[dict]] = {}
    for rep in range(args.repeat):
        for size in args.sizes:
            for mode in args.modes:
                cmd = [sys.executable, __file__, "_one", "x".join(map(str, size)), mode, str(args.roi),
                       str(args.overlap), str(args.sw_batch), args.device]  # fmt: skip
                before = load_avg()
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    print(f"{size} {mode}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                    continue
                result = json.loads(out.stdout.strip().splitlines()[-1])
                result["load"] = f"{before} -> {load_avg()}"
                runs.setdefault((size, mode), []).append(result)
                print(f"  repeat {rep} {'x'.join(map(str, size))} {mode}: {result}", file=sys.stderr, flush=True)
    rows = []
    for (size, mode), results in runs.items():
        fp32 = runs.get((size, "fp32"))
        row = {
            "size": "x".join(map(str, size)),
            "roi": "x".join(map(str, roi_for(size, args.roi))),
            "mode": mode,
            "runs": len(results),
            "seconds": min(r["seconds"] for r in results),
            "seconds_all": [round(r["seconds"], 2) for r in results],
            "peak_mib": min(r["peak_mib"] for r in results),
        }
        if fp32:
            row["speedup"] = min(r["seconds"] for r in fp32) / row["seconds"]
            row["mem_ratio"] = row["peak_mib"] / min(r["peak_mib"] for r in fp32)
        rows.append(row)
    print(f"\n{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads; overlap {args.overlap}, "
          f"sw_batch {args.sw_batch}, device {args.device}; min of {args.repeat} interleaved runs\n")  # fmt: skip
    print(markdown_table([
        {"volume": r["size"], "ROI": r["roi"], "mode": r["mode"], "s/case (min)": r["seconds"],
         "all runs s": str(r["seconds_all"]), "fp32 s / s": r.get("speedup"), "peak MiB": r["peak_mib"],
         "peak / fp32": r.get("mem_ratio")}
        for r in rows
    ]))  # fmt: skip
    return rows


def compose_predict(*overrides: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from medseg import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("predict", overrides=list(overrides))


def run_predict(ckpt: str, images: Path, out: Path, *overrides: str) -> float:
    """`medseg.predict` with the real config; returns its wall time in seconds."""
    from medseg.predict import predict

    cfg = compose_predict(f"ckpt_path={ckpt}", f"input={images}", f"output={out}", "progress=false", *overrides)
    start = time.perf_counter()
    predict(cfg)
    return time.perf_counter() - start


def case_folder(items: list[dict], folder: Path) -> Path:
    """A folder of symlinks to the cases' images (what a user would point `input=` at)."""
    folder.mkdir(parents=True, exist_ok=True)
    for item in items:
        link = folder / Path(item["image"]).name
        if not link.exists():
            link.symlink_to(Path(item["image"]).resolve())
    return folder


def folder(args: argparse.Namespace) -> list[dict]:
    images = sorted(p for p in Path(args.images).iterdir() if p.name.endswith((".nii", ".nii.gz")))[: args.cases]
    times: dict[tuple, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = case_folder([{"image": str(p)} for p in images], Path(tmp) / "in")
        for rep in range(args.repeat):
            for workers in args.workers:
                for mode in args.modes:
                    out = Path(tmp) / f"out_{mode}_{workers}_{rep}"
                    seconds = run_predict(args.ckpt, src, out, f"dtype={mode}", f"num_workers={workers}",
                                          "device=cpu", "overwrite=true")  # fmt: skip
                    times.setdefault((mode, workers), []).append(seconds)
                    print(f"  repeat {rep} {mode} workers={workers}: {seconds:.1f} s", file=sys.stderr, flush=True)
    print(f"\n{cpu_name()}; {len(images)} cases of {args.images}; checkpoint {args.ckpt}; min of {args.repeat}\n")
    rows = [
        {"dtype": mode, "workers": workers, "s (min)": min(ts), "all runs s": str([round(t, 1) for t in ts]),
         "cases/s": len(images) / min(ts)}
        for (mode, workers), ts in times.items()
    ]  # fmt: skip
    print(markdown_table(rows))
    return rows


def score(pred_dir: Path, labels_dir: Path, names: list[str]) -> dict:
    from medseg.evaluate import evaluate

    return evaluate(pred_dir, labels_dir, pred_dir / "eval.csv", names)


def validation_split(run: Path) -> tuple[list[dict], list[str]]:
    """The run's validation cases, from the data settings in its .hydra/config.yaml (the split needs only these)."""
    from omegaconf import OmegaConf

    from medseg.data.datamodule import MSDDataModule

    data = OmegaConf.load(run / ".hydra" / "config.yaml").data
    keys = ("root", "patch_size", "val_fraction", "fold", "num_folds", "seed")
    datamodule = MSDDataModule(**{k: OmegaConf.to_object(data[k]) if k == "patch_size" else data[k] for k in keys},
                               validate=False)  # fmt: skip
    return datamodule.split()[1], datamodule.label_names


def dice(args: argparse.Namespace) -> dict:
    from medseg.checkpoint import best_checkpoint

    run = Path(args.run)
    items, names = validation_split(run)
    ckpt = best_checkpoint(run)
    labels = Path(items[0]["label"]).parent
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = case_folder(items, Path(tmp) / "in")
        for mode in args.modes:
            out = Path(tmp) / mode
            run_predict(str(ckpt), src, out, f"dtype={mode}", "postprocessing=none", "device=cpu")
            result[mode] = score(out, labels, names)
            masks = {p.name: np.asarray(__import__("nibabel").load(p).dataobj) for p in sorted(out.glob("*.nii.gz"))}
            result[mode]["_masks"] = masks
    ref = result[args.modes[0]]
    print(f"\n{cpu_name()}; {len(items)} validation cases of {run}; checkpoint {ckpt.name}; mirroring as tested\n")
    rows = []
    for mode in args.modes:
        r = result[mode]
        differ = sum(int((r["_masks"][k] != ref["_masks"][k]).sum()) for k in r["_masks"])
        total = sum(m.size for m in r["_masks"].values())
        rows.append({"dtype": mode, "mean Dice": r["dice"], **{n: r[f"dice/{n}"] for n in names[1:]},
                     "- fp32": r["dice"] - ref["dice"], "voxels differing": f"{differ} of {total}"})  # fmt: skip
    print(markdown_table(rows))
    return {m: {k: v for k, v in r.items() if k != "_masks"} for m, r in result.items()}


def ensemble(args: argparse.Namespace) -> list[dict]:
    from medseg.inference import postprocess
    from medseg.inference.ensemble import checkpoint_paths

    items = json.loads(Path(args.cases).read_text())
    base = Path(args.cases).parent
    for item in items:
        item["image"], item["label"] = str(base / item["image"]), str(base / item["label"])
    labels = Path(items[0]["label"]).parent
    ckpts = checkpoint_paths(args.runs)
    names = json.loads((base / "dataset.json").read_text())["labels"]
    names = [names[k] for k in sorted(names, key=int)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = case_folder(items, Path(tmp) / "in")
        models = [(f"fold {i}", [str(c)], [c]) for i, c in enumerate(ckpts)] + [("ensemble", [args.runs], ckpts)]
        for name, ckpt, paths in models:
            out = Path(tmp) / name.replace(" ", "")
            ckpt_arg = ckpt[0] if len(ckpt) == 1 else f"[{','.join(ckpt)}]"
            seconds = run_predict(ckpt_arg, src, out, f"dtype={args.dtype}", "postprocessing=none")
            plain = score(out, labels, names)
            record = postprocess.for_checkpoints(paths, Path(args.runs) if name == "ensemble" else None)
            keep = record["keep_largest"] if record else []
            pp = out.parent / f"{out.name}_pp"
            pp.mkdir()
            import nibabel as nib

            for mask_path in sorted(out.glob("*.nii.gz")):
                img = nib.load(mask_path)
                mask = postprocess.keep_largest(np.asarray(img.dataobj)[None], keep)[0]
                nib.save(nib.Nifti1Image(np.asarray(mask).astype(np.uint8), img.affine), pp / mask_path.name)
            after = score(pp, labels, names)
            rows.append({"model": name, "seconds": seconds, "plain": plain, "post": after,
                         "keep": [names[i] for i in keep]})  # fmt: skip
            print(f"  {name}: {plain['dice']:.4f} / {after['dice']:.4f} ({seconds:.0f} s)", file=sys.stderr, flush=True)
    best = max((r for r in rows if r["model"] != "ensemble"), key=lambda r: r["plain"]["dice"])
    print(f"\n{cpu_name()}; {len(items)} held-out cases ({args.cases}); dtype {args.dtype}\n")
    print(markdown_table([
        {"model": r["model"] + (" (best fold)" if r is best else ""), "mean Dice": r["plain"]["dice"],
         **{n: r["plain"][f"dice/{n}"] for n in names[1:]}, "keep-largest for": ", ".join(r["keep"]) or "-",
         "Dice after": r["post"]["dice"], "s": r["seconds"]}
        for r in rows
    ]))  # fmt: skip
    ens = rows[-1]
    print(f"\nensemble - best fold: {ens['plain']['dice'] - best['plain']['dice']:+.4f} mean Dice "
          f"(median fold {statistics.median(r['plain']['dice'] for r in rows[:-1]):.4f})")  # fmt: skip
    return rows


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_one":
        size, mode, roi, overlap, sw_batch, device = argv[1:]
        result = one_run(parse_size(size), mode, int(roi), float(overlap), int(sw_batch), device)
        print(json.dumps(result))
        return result
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sizes")
    p.add_argument("--sizes", nargs="+", type=parse_size,
                   default=[(35, 50, 35), (128, 128, 128), (256, 256, 256), (512, 512, 256)])  # fmt: skip
    p.add_argument("--modes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--roi", type=int, default=128)
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--sw-batch", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p = sub.add_parser("folder")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--cases", type=int, default=52)
    p.add_argument("--modes", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--workers", nargs="+", type=int, default=[0, 2])
    p.add_argument("--repeat", type=int, default=2)
    p = sub.add_parser("dice")
    p.add_argument("--run", required=True, help="a training run folder (its .hydra/config.yaml gives the split)")
    p.add_argument("--modes", nargs="+", default=["fp32", "bf16"])
    p = sub.add_parser("ensemble")
    p.add_argument("--runs", required=True, help="a folder of fold runs (e.g. a multirun folder)")
    p.add_argument("--cases", required=True, help="JSON list of {image, label}, relative to its folder")
    p.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)
    return {"sizes": sizes, "folder": folder, "dice": dice, "ensemble": ensemble}[args.command](args)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    main()
