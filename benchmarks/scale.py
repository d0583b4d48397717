"""Whole-body scale benchmark (issue 22): TotalSegmentator-like CT, and prediction peak memory and time against
classes and slices, the whole-volume path (`sliding_window_probs`, before slab stitching) vs slab stitching.

    PYTHONPATH=. python benchmarks/scale.py generate --out DIR --cases 4 --shape 512x512x300 [--classes 118]
    PYTHONPATH=. python benchmarks/scale.py predict                   # classes 3 26 118 x slices 300 1000 x bf16 fp32
    PYTHONPATH=. python benchmarks/scale.py predict --classes 118 --slices 1000 --paths slab   # the issue's target
    PYTHONPATH=. python benchmarks/scale.py predict --smoke           # 64 x 64 x 80, 3 and 8 classes: end to end
    PYTHONPATH=. python benchmarks/scale.py agree --ckpt RUN --images IMG... [--stack-z 2] [--labels DIR]  # trained

`generate`: an MSD folder of CT cases (`medseg.data.synthetic.write_ct_dataset`: HU intensities, 117 organ-like
classes, CT affines, 0.8 x 0.8 x 1.5 mm unless `--spacing`). `predict`: per slice count one 512 x 512 x S CT
(`--xy`, `--spacing`, default 0.8 x 0.8 x 1.0 mm as the issue's 1000-slice scan) and per class count a randomly
initialised U-Net checkpoint (conf/model/unet.yaml, `benchmarks/predict.py`'s net, seed 0) trained, as it were, at
1.5 mm with a `--roi` cubed patch, predicted as `medseg.predict` predicts one case (`Predictor`: load, preprocess,
stitch tile by tile, argmax, `invert_labels` back to 512 x 512 x S; no mirroring, no postprocessing). Every
(slices, classes, dtype, path) runs in a fresh process; peak = that process' peak RSS (`ru_maxrss`, everything
included: Python, torch, the image as loaded), `predict peak` = the peak after preprocessing (VmHWM reset through
/proc/self/clear_refs). The whole-volume path is skipped where it would need more than `--max-gb` (its buffers:
C + 1 channels of the preprocessed volume). A path may name the sums' dtype: `slab:bf16`, `whole:fp32` (the
whole-volume path with exact sums of the same net's windows); `slab` alone sums as `medseg.predict` does
(`sum_dtype=auto`: FP16 for BF16 windows), `whole` alone in the windows' dtype (MONAI). `differ`: voxels whose class
differs from the first path's mask; `Dice mean / min`: against it, over the classes present; `... vs exact sums`:
the same against `whole:fp32`, where that path is listed.
`agree`: a trained checkpoint on real images (a random net's classes are near-ties everywhere, so its Dice measures
rounding more than a user would see): each dtype's tiles-path mask against its whole-volume mask and against FP32's,
and with `--labels` against the truth. `generate --levels fixed` writes CT whose organ k keeps its HU level in every
case, which a net can learn: the way to a trained many-class net here, where no real CT is.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))  # a folder of scripts: the sibling script, also when imported
from predict import DTYPES, cpu_name, load_avg, parse_size, unet, unet_node, vm_rss_mib  # noqa: E402

from medseg.data.synthetic import write_ct_dataset  # noqa: E402
from medseg.tracking.tables import markdown_table  # noqa: E402

TARGET_SPACING = 1.5  # mm, the prediction grid
CT_CLASSES = 118  # TotalSegmentator's 117 structures + background


def peak_mib() -> float:
    """This process' VmHWM (peak RSS since the last `reset_peak`), MiB."""
    return vm_rss_mib("VmHWM")


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def random_checkpoint(path: Path, num_classes: int, roi: int) -> Path:
    """A medseg checkpoint of `benchmarks/predict.py`'s random U-Net for CT at 1.5 mm, as `medseg.train` saves one
    (`hyper_parameters.inference`: what `Predictor` reads)."""
    from omegaconf import OmegaConf

    if path.is_file():
        return path
    inference = {
        "net": OmegaConf.to_container(unet_node(num_classes), resolve=True),
        "spacing": [TARGET_SPACING] * 3,
        "modality": "CT",
        "patch_size": [roi] * 3,
        "ct_window": [-1000.0, 1000.0],
        "label_names": ["background", *(f"organ_{c:03d}" for c in range(1, num_classes))],
    }
    state = {f"net.{k}": v for k, v in unet(num_classes).state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"inference": inference, "test_mirror_axes": []}}, path)
    return path


def whole_volume_mask(predictor, data: dict, sums: torch.dtype | None = None) -> np.ndarray:
    """The mask as `Predictor.predict_case` made it before slab stitching: each model's whole-volume probabilities
    (`sliding_window_probs`, C channels of the whole volume), averaged, argmax, Invertd; no postprocessing. `sums`:
    MONAI's buffers in this dtype instead of the windows' (it sums in its input's dtype; each window goes back to the
    net's dtype, exactly: the image was rounded to that dtype first)."""
    from monai.transforms import Invertd

    from medseg.inference.predictor import net_input
    from medseg.models.sliding_window import probs_to_labels, sliding_window_probs

    x = net_input(data, predictor.dtype, predictor.device)
    sums = sums or predictor.dtype
    total = None
    with torch.no_grad():
        for net, roi, axes in zip(predictor.nets, predictor.rois, predictor.mirror_axes, strict=True):
            in_net_dtype = net if sums == predictor.dtype else lambda w, net=net: net(w.to(predictor.dtype))
            probs = sliding_window_probs(in_net_dtype, x.to(sums), roi, predictor.sw_batch_size, predictor.overlap,
                                         mirror_axes=axes, dtype=sums)  # fmt: skip
            total = probs if total is None else total.add_(probs)
    del x
    total = total.div_(len(predictor.nets)) if len(predictor.nets) > 1 else total
    labels = probs_to_labels(total)[0]
    del total, probs
    record = data["image"]
    invert = Invertd("pred", transform=predictor.preprocess, orig_keys="image", nearest_interp=True)
    pred = invert({"image": record, "pred": predictor._with_record(labels.float(), record)})["pred"]
    return np.asarray(pred[0]).round().astype(np.uint8)


def split_path(path: str) -> tuple[str, str]:
    """`whole` or `slab`, and the sums' dtype after a colon (`slab:fp16`); none given: the whole path sums in the
    windows' dtype (MONAI), the tiles path as `Predictor`'s `sum_dtype=auto`."""
    kind, _, sums = path.partition(":")
    if kind not in ("whole", "slab") or sums not in ("", *DTYPES):
        raise argparse.ArgumentTypeError(f"a path is whole or slab, with :fp32, :bf16 or :fp16 or not, got {path!r}")
    return kind, sums


def checked_path(path: str) -> str:
    split_path(path)
    return path


def one_run(ckpt: str, image: str, dtype: str, path: str, sw_batch: int, overlap: float, mask_out: str) -> dict:
    """Worker: one case predicted by one path in this fresh process; times, peaks, and its mask saved."""
    from medseg.inference.predictor import Predictor

    kind, sums = split_path(path)
    predictor = Predictor(ckpt, "cpu", sw_batch, overlap, mirror_axes=[], dtype=dtype, postprocessing="none",
                          sum_dtype=sums or "auto")  # fmt: skip
    start = time.perf_counter()
    data = predictor.preprocess({"image": image})
    shape = list(data["image"].shape[1:])
    loaded = time.perf_counter()
    load_peak = peak_mib()
    reset_peak()
    if kind == "slab":
        mask, summed = predictor.predict_case(data)[0], predictor.sum_dtype
    else:
        summed = DTYPES[sums] if sums else predictor.dtype
        mask = whole_volume_mask(predictor, data, summed)
    done = time.perf_counter()
    np.save(mask_out, mask)
    sums_name = next(name for name, d in DTYPES.items() if d == summed)
    return {"load_s": loaded - start, "predict_s": done - loaded, "seconds": done - start, "shape": shape,
            "sums": sums_name,
            "load_peak_mib": load_peak, "predict_peak_mib": peak_mib(),
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # fmt: skip


def run_one(ckpt: Path, image: Path, dtype: str, path: str, args: argparse.Namespace, mask: Path) -> dict:
    """`one_run` in a fresh process (its peak is its own); its result, or a note saying why it failed."""
    cmd = [sys.executable, __file__, "_one", str(ckpt), str(image), dtype, path, str(args.sw_batch), str(args.overlap),
           str(mask)]  # fmt: skip
    before = load_avg()
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stderr[-2000:], file=sys.stderr)
        return {"note": f"failed: {out.stderr.strip().splitlines()[-1][:80]}"}
    result = {**json.loads(out.stdout.strip().splitlines()[-1]), "load": f"{before} -> {load_avg()}"}
    print(f"  {path} {dtype} {image.name}: {result}", file=sys.stderr, flush=True)
    return result


def compare(rows: dict[str, dict], masks: dict[str, Path], refs: dict[str, str], classes: int) -> None:
    """Adds to each path's row (`rows[path]`) `differ<suffix>` and `Dice<suffix>` against each reference path
    (`refs`: suffix -> path) that has a mask; the mask files are deleted."""
    loaded = {path: np.load(m) for path, m in masks.items()}
    for m in masks.values():
        m.unlink()
    for suffix, ref in refs.items():
        for path, mask in loaded.items():
            if ref in loaded and path != ref:
                rows[path][f"differ{suffix}"] = f"{int((mask != loaded[ref]).sum())} of {mask.size}"
                rows[path][f"Dice{suffix}"] = class_dice(mask, loaded[ref], classes)


def class_dice(a: np.ndarray, b: np.ndarray, classes: int) -> str:
    """Dice of two label maps per class present in either, as "mean / min" over those classes."""
    pairs = np.bincount(a.astype(np.int64).ravel() * classes + b.ravel(), minlength=classes * classes)
    pairs = pairs.reshape(classes, classes)
    both, total = np.diag(pairs), pairs.sum(0) + pairs.sum(1)
    dice = 2 * both[total > 0] / total[total > 0]
    return f"{dice.mean():.6f} / {dice.min():.6f}"


def ct_image(work: Path, xy: int, slices: int, spacing: tuple[float, ...]) -> Path:
    """One CT of xy x xy x slices (generated once per work folder)."""
    root = work / f"ct_{xy}x{xy}x{slices}_{'x'.join(map(str, spacing))}"
    if not (root / "dataset.json").is_file():
        write_ct_dataset(root, 1, CT_CLASSES, (xy, xy, slices), spacing, seed=slices)
    return root / "imagesTr" / "ct_0000.nii.gz"


def whole_volume_gib(xy: int, slices: int, spacing: tuple[float, ...], classes: int, dtype: str) -> float:
    voxels = np.prod([n * s / TARGET_SPACING for n, s in zip((xy, xy, slices), spacing, strict=True)])
    return float((classes + 1) * voxels * torch.empty((), dtype=DTYPES[dtype]).element_size() / 2**30)


def predict(args: argparse.Namespace) -> list[dict]:
    work = Path(args.work or tempfile.mkdtemp(prefix="medseg_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for slices in args.slices:
        image = ct_image(work, args.xy, slices, args.spacing)
        for classes in args.classes:
            ckpt = random_checkpoint(work / f"unet_{classes}_{args.roi}.ckpt", classes, args.roi)
            for dtype in args.dtypes:
                masks, group = {}, {}
                for path in args.paths:
                    row = group[path] = {"slices": slices, "classes": classes, "dtype": dtype, "path": path}
                    rows.append(row)
                    need = whole_volume_gib(args.xy, slices, args.spacing, classes, split_path(path)[1] or dtype)
                    if path.startswith("whole") and need > args.max_gb:
                        row["note"] = f"skipped: needs ~{need:.0f} GiB"
                        continue
                    mask = work / f"mask_{slices}_{classes}_{dtype}_{path.replace(':', '_')}.npy"
                    row.update(run_one(ckpt, image, dtype, path, args, mask))
                    if "note" not in row:
                        masks[path] = mask
                compare(group, masks, {"": args.paths[0], " vs exact sums": "whole:fp32"}, classes)
    print(f"\n{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads; {args.xy} x {args.xy} x S "
          f"CT at {' x '.join(map(str, args.spacing))} mm predicted at {TARGET_SPACING} mm, U-Net {args.roi}^3 "
          f"windows, overlap {args.overlap}, {args.sw_batch} a batch; one fresh process per row\n")  # fmt: skip
    whole = {(r["slices"], r["classes"], r["dtype"]): r for r in rows if r["path"] == "whole" and "seconds" in r}
    table = []
    for r in rows:
        ref = whole.get((r["slices"], r["classes"], r["dtype"]))
        timed = "seconds" in r
        table.append({
            "slices": r["slices"], "net grid": "x".join(map(str, r.get("shape", []))), "classes": r["classes"],
            "dtype": r["dtype"], "path": r["path"], "sums": r.get("sums"), "s/case": r.get("seconds"),
            "load s": r.get("load_s"),
            "predict s": r.get("predict_s"), "peak MiB": r.get("peak_mib"),
            "predict peak MiB": r.get("predict_peak_mib"),
            "time / whole": r["seconds"] / ref["seconds"] if timed and ref else None,
            "peak / whole": r["peak_mib"] / ref["peak_mib"] if timed and ref else None,
            "differ": r.get("differ", ""), "Dice mean / min": r.get("Dice", ""),
            **({"differ vs exact sums": r.get("differ vs exact sums", ""),
                "Dice vs exact sums": r.get("Dice vs exact sums", "")} if "whole:fp32" in args.paths else {}),
            "note": r.get("note", ""),
        })  # fmt: skip
    print(markdown_table(table))
    return rows


def stack_z(image: Path, copies: int, work: Path) -> Path:
    """The image repeated `copies` times along its third axis, saved in `work`: a head scan made longer than it is
    wide, as a whole-body CT is, so that the tiles path visits windows in another order than MONAI."""
    import nibabel as nib

    img = nib.load(image)
    data = np.concatenate([np.asanyarray(img.dataobj)] * copies, axis=2)
    out = work / f"stack{copies}_{image.name}"
    nib.save(nib.Nifti1Image(data, img.affine, img.header), out)
    return out


def label_map(label: Path, copies: int, work: Path) -> np.ndarray:
    """The ground truth for an image, stacked as `stack_z` stacks the image (uint8 X, Y, Z)."""
    import nibabel as nib

    if copies > 1:
        (work / "labels").mkdir(exist_ok=True)
        label = stack_z(label, copies, work / "labels")
    return np.asarray(nib.load(label).dataobj).round().astype(np.uint8)


def agree(args: argparse.Namespace) -> list[dict]:
    """A trained checkpoint on real images: per image and dtype, each path's mask (`--paths`) against the
    whole-volume path's of the same dtype, against FP32's whole-volume mask, and against the same dtype's
    whole-volume mask with FP32 sums (`whole:fp32`) where that path is listed."""
    work = Path(args.work or tempfile.mkdtemp(prefix="medseg_agree_"))
    work.mkdir(parents=True, exist_ok=True)
    missing = [str(Path(args.labels) / Path(i).name) for i in args.images if args.labels]
    missing = [m for m in missing if not Path(m).is_file()]
    if missing:  # before any prediction runs
        raise SystemExit(f"agree --labels: no label file for these images: {', '.join(missing)}")
    rows = []
    for image in map(Path, args.images):
        truth = label_map(Path(args.labels) / image.name, args.stack_z, work) if args.labels else None
        image = stack_z(image, args.stack_z, work) if args.stack_z > 1 else image
        masks, grid = {}, ""
        for dtype in args.dtypes:
            for path in args.paths:
                mask = work / f"mask_{dtype}_{path.replace(':', '_')}.npy"
                result = run_one(Path(args.ckpt), image, dtype, path, args, mask)
                if "note" in result:
                    rows.append({"image": image.name, "dtype": dtype, "path": path, "note": result["note"]})
                    continue
                masks[dtype, path], grid = np.load(mask), "x".join(map(str, result["shape"]))
                mask.unlink()
        classes = 1 + int(max(m.max() for m in [*masks.values(), *([truth] if truth is not None else [])]))
        for (dtype, path), m in masks.items():
            row = {"image": image.name, "net grid": grid, "dtype": dtype, "path": path}
            refs = [
                ("whole", masks.get((dtype, "whole"))),
                ("fp32 whole", masks.get(("fp32", "whole"))),
                ("exact sums", masks.get((dtype, "whole:fp32"))),
            ]
            for name, ref in [*refs, ("truth", truth)]:
                if ref is not None and ref is not m:
                    row[f"differ vs {name}"] = int((m != ref).sum())
                    row[f"Dice vs {name} (mean / min)"] = class_dice(m, ref, classes)
            rows.append(row)
    print(f"\n{cpu_name()}, torch {torch.__version__}; checkpoint {args.ckpt}; no mirroring, no postprocessing\n")
    print(markdown_table(rows, list(dict.fromkeys(k for r in rows for k in r))))
    return rows


def generate(args: argparse.Namespace) -> Path:
    start = time.perf_counter()
    root = write_ct_dataset(args.out, args.cases, args.classes, args.shape, args.spacing, args.seed, args.levels)
    print(f"wrote {args.cases} case(s) of {args.shape} to {root} in {time.perf_counter() - start:.0f} s")
    return root


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_one":
        ckpt, image, dtype, path, sw_batch, overlap, mask = argv[1:]
        result = one_run(ckpt, image, dtype, path, int(sw_batch), float(overlap), mask)
        print(json.dumps(result))
        return result
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("generate")
    p.add_argument("--out", required=True)
    p.add_argument("--cases", type=int, default=4)
    p.add_argument("--shape", type=parse_size, default=(512, 512, 300))
    p.add_argument("--classes", type=int, default=CT_CLASSES)
    p.add_argument("--spacing", type=float, nargs=3, default=(0.8, 0.8, 1.5))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--levels", choices=["random", "fixed"], default="random", help="organ HU levels (make_ct_case)")
    p = sub.add_parser("predict")
    p.add_argument("--classes", type=int, nargs="+", help="default 3 26 118 (--smoke: 3 8)")
    p.add_argument("--slices", type=int, nargs="+", default=[300, 1000])
    p.add_argument("--xy", type=int, default=512)
    p.add_argument("--spacing", type=float, nargs=3, default=(0.8, 0.8, 1.0))
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    p.add_argument(
        "--paths",
        nargs="+",
        default=["whole", "slab"],
        type=checked_path,
        help="whole or slab[:fp32|bf16|fp16] (the sums' dtype); the first is the others' reference, "
        "and whole:fp32 (exact sums of the same net) is one too where listed",
    )
    p.add_argument("--roi", type=int, default=128)
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--sw-batch", type=int, default=2)
    p.add_argument("--max-gb", type=float, default=16.0, help="skip the whole-volume path above this estimate")
    p.add_argument("--work", help="folder for the CT images and checkpoints (kept, reused); default a temp folder")
    p.add_argument("--smoke", action="store_true", help="64 x 64 x 80, 3 and 8 classes, 32^3 windows")
    p = sub.add_parser("agree")
    p.add_argument("--ckpt", required=True, help="a trained checkpoint or run folder")
    p.add_argument("--images", nargs="+", required=True, help="NIfTI images the checkpoint was trained for")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    p.add_argument("--paths", nargs="+", default=["whole", "slab"], type=checked_path, help="as predict's")
    p.add_argument("--stack-z", type=int, default=1, help="repeat each image N times along its third axis")
    p.add_argument("--labels", help="a folder of the images' labels (same file names): each mask's Dice vs truth")
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--sw-batch", type=int, default=2)
    p.add_argument("--work", help="folder for stacked images and masks; default a temp folder")
    args = parser.parse_args(argv)
    if args.command == "agree" and args.stack_z < 1:
        parser.error(f"--stack-z must be at least 1, got {args.stack_z}")
    if args.command == "predict" and args.smoke:
        args.xy, args.slices, args.roi = 64, [80], 32
    if args.command == "predict" and not args.classes:
        args.classes = [3, 8] if args.smoke else [3, 26, 118]
    return {"generate": generate, "predict": predict, "agree": agree}[args.command](args)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
