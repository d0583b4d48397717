"""Prediction time and peak memory beside nnU-Net v2 on one CT-like volume: the same planned network, each tool's
default test-time mirroring and none.

    python benchmarks/peers/predict_speed.py --work peers_work/predict --venv peers_work/venv  # 512x512x256, 4, 118 cl.
    python benchmarks/peers/predict_speed.py --work /tmp/peers_predict --smoke                  # 64x64x48, 3 and 8
    python benchmarks/peers/predict_speed.py --work DIR --shape 320x320x192 --mirroring none    # RESULTS.md's table

On a 2-core CPU nnU-Net's unmirrored prediction of the default 512x512x256 volume alone takes about 30 minutes, a
mirrored one about 4 hours (benchmarks/RESULTS.md, "Peers"), hence the smaller volume and no mirroring there.

Per class count C, under `<work>/ct<C>/`:
1. a TotalSegmentator-like CT folder (`write_ct_dataset`: `--cases` scans of `--shape` at `--spacing`, C classes
   with background), planned and preprocessed by nnU-Net (`nnUNetv2_convert_MSD_dataset`,
   `nnUNetv2_plan_and_preprocess -c 3d_fullres`; its trainer, which builds the model folder, reads the preprocessed
   folder);
2. nnU-Net's model folder: its own `nnUNetTrainer` of that plan with random weights (nnunet_model.py, peer venv);
   medseg's checkpoint: the same network (the plan's kernels, strides and filters) as a MONAI DynUNet at the plan's
   spacing and patch, each list reversed (nnU-Net's arrays are z, y, x; medseg's x, y, z), CT window -1000..1000;
3. the first case predicted from its NIfTI file to a NIfTI mask by `nnUNetv2_predict` (FP32 windows, FP16 logits)
   and by `python -m medseg.predict` at `dtype=auto` (BF16 on a CPU) and `fp32`, with each tool's default mirroring
   (all three axes in both) and with none (`--disable_tta`, `mirror_axes=[]`). Each command runs alone, timed from
   its start to its mask on disk (run_timed: wall, and the peak summed RSS of its process tree). A command whose
   tree passes `--max-gib` is stopped; its row says so.
Random weights change neither time nor memory; no Dice here (the trained comparison is nnunet.py). Finished rows are
kept in `<work>/predict_speed.json` and skipped on a rerun.
"""

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import nnunet_env
import torch
from nnunet import DATASET_ID, cpu_name, stage_msd
from step_speed import nnunet_plan
from timed import MemoryLimitExceeded, run_timed

from medseg.data.synthetic import write_ct_dataset
from medseg.tracking.tables import markdown_table

CT_WINDOW = [-1000.0, 1000.0]
RUNS = [  # (tool, precision, mirroring)
    ("nnU-Net v2", "fp32", "default"),
    ("nnU-Net v2", "fp32", "none"),
    ("medseg", "auto", "default"),
    ("medseg", "auto", "none"),
    ("medseg", "fp32", "default"),
    ("medseg", "fp32", "none"),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="everything is written here")
    p.add_argument("--classes", type=int, nargs="+", default=[4, 118], help="class counts, background included")
    p.add_argument("--shape", default="512x512x256", help="voxels of each generated CT")
    p.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 1.5], help="mm")
    p.add_argument("--cases", type=int, default=2, help="cases nnU-Net plans from (the first is predicted)")
    p.add_argument("--mirroring", nargs="+", default=["default", "none"], choices=["default", "none"])
    p.add_argument("--workers", type=int, default=2, help="loader/export processes of both tools")
    p.add_argument("--max-gib", type=float, default=20.0, help="stop a command whose process tree passes this")
    p.add_argument("--smoke", action="store_true", help="64x64x48, 3 and 8 classes")
    p.add_argument("--venv", type=Path, default=None, help="the peer virtual environment; default <work>/venv")
    args = p.parse_args(argv)
    if args.smoke:
        args.classes, args.shape, args.cases = [3, 8], "64x64x48", 2
    try:
        args.shape = tuple(int(s) for s in args.shape.lower().split("x"))
        assert len(args.shape) == 3
    except (ValueError, AssertionError):
        p.error(f"--shape must be XxYxZ voxels, e.g. 512x512x256, got {args.shape!r}")
    if not all(2 <= c <= 256 for c in args.classes):
        p.error(f"--classes must be in [2, 256] (uint8 labels), got {args.classes}")
    return args


def medseg_checkpoint(config: dict, dataset: dict, path: Path) -> Path:
    """A medseg checkpoint (what `Predictor` reads) of nnU-Net's planned 3d_fullres network as a DynUNet, random
    weights, axes in medseg's x, y, z order."""
    from hydra.utils import instantiate

    arch = config["architecture"]["arch_kwargs"]
    xyz = [list(reversed(v)) for v in (config["spacing"], config["patch_size"])]
    strides = [list(reversed(s)) for s in arch["strides"]]
    net = {
        "_target_": "monai.networks.nets.DynUNet",
        "spatial_dims": 3,
        "in_channels": len(dataset["channel_names"]),
        "out_channels": len(dataset["labels"]),
        "kernel_size": [list(reversed(k)) for k in arch["kernel_sizes"]],
        "strides": strides,
        "upsample_kernel_size": strides[1:],
        "filters": list(arch["features_per_stage"]),
        "norm_name": "instance",
    }
    names = sorted(dataset["labels"], key=lambda k: dataset["labels"][k])
    inference = {"net": net, "spacing": xyz[0], "modality": "CT", "patch_size": xyz[1], "ct_window": CT_WINDOW}
    inference["label_names"] = names
    torch.manual_seed(0)
    state = {f"net.{k}": v for k, v in instantiate(net).state_dict().items()}
    hyper = {"inference": inference, "test_mirror_axes": [0, 1, 2]}  # medseg's default after training: all axes
    torch.save({"state_dict": state, "hyper_parameters": hyper}, path)
    return path


class PredictSpeed:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.work = args, args.work.resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.venv = (args.venv or self.work / "venv").resolve()
        self.results_file = self.work / "predict_speed.json"
        self.results = json.loads(self.results_file.read_text()) if self.results_file.is_file() else {}

    def prepare(self, classes: int) -> tuple[dict, Path, Path]:
        """(nnU-Net's env for this class count, medseg's checkpoint, the CT to predict)."""
        a, work = self.args, self.work / f"ct{classes}"
        env = {f"nnUNet_{k}": str(work / f"nnUNet_{k}") for k in ("raw", "preprocessed", "results")}
        env["nnUNet_def_n_proc"] = str(a.workers)
        msd = work / "msd_source"
        if not (msd / "dataset.json").is_file():
            write_ct_dataset(msd, num_cases=a.cases, num_classes=classes, shape=a.shape, spacing=tuple(a.spacing))
        staged, logs = stage_msd(msd, work), work / "logs"
        dataset = f"Dataset{DATASET_ID:03d}_{staged.name.split('_', 1)[1]}"
        model = Path(env["nnUNet_results"]) / dataset / "nnUNetTrainer__nnUNetPlans__3d_fullres"
        if not (model / "fold_0" / "checkpoint_final.pth").is_file():
            tool = lambda name: nnunet_env.tool(self.venv, name)  # noqa: E731
            run_timed([tool("nnUNetv2_convert_MSD_dataset"), "-i", str(staged)], logs / "convert.log", env)
            plan = [tool("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "3d_fullres"]
            plan += ["-npfp", str(a.workers), "-np", str(a.workers)]  # its trainer reads the preprocessed folder
            run_timed(plan, logs / "plan.log", env)
            script = str(Path(__file__).with_name("nnunet_model.py"))
            folder = Path(env["nnUNet_preprocessed"]) / dataset
            run_timed([str(nnunet_env.venv_python(self.venv)), script, str(folder)], logs / "model.log", env)
        _, config, dataset_json = nnunet_plan(work)
        ckpt = work / "medseg_random.ckpt"
        if not ckpt.is_file():
            medseg_checkpoint(config, dataset_json, ckpt)
        return env, ckpt, staged / "imagesTr" / "ct_0000.nii.gz"

    def command(self, tool: str, precision: str, mirroring: str, ckpt: Path, image: Path, out: Path) -> list[str]:
        if tool == "medseg":
            cmd = [sys.executable, "-m", "medseg.predict", f"ckpt_path={ckpt}", f"input={image}", f"output={out}"]
            cmd += [f"dtype={precision}", "postprocessing=none", "progress=false", f"num_workers={self.args.workers}"]
            cmd += [f"hydra.run.dir={out}_hydra"] + (["mirror_axes=[]"] if mirroring == "none" else [])
            return cmd
        inputs = out.parent / "nnunet_input"
        if not inputs.is_dir():
            inputs.mkdir(parents=True)
            (inputs / "ct_0000_0000.nii.gz").symlink_to(image.resolve())  # nnU-Net's channel suffix
        cmd = [nnunet_env.tool(self.venv, "nnUNetv2_predict"), "-i", str(inputs), "-o", str(out)]
        cmd += ["-d", str(DATASET_ID), "-c", "3d_fullres", "-f", "0", "-tr", "nnUNetTrainer", "-device", "cpu"]
        cmd += ["-npp", str(self.args.workers), "-nps", str(self.args.workers)]
        return cmd + (["--disable_tta"] if mirroring == "none" else [])

    def run(self) -> list[dict]:
        a = self.args
        nnunet_env.install(self.venv, log=self.work / "install.log")
        for classes in a.classes:
            env, ckpt, image = self.prepare(classes)
            for tool, precision, mirroring in RUNS:
                key = f"{classes}/{tool}/{precision}/{mirroring}"
                if mirroring not in a.mirroring or key in self.results:
                    continue
                out = self.work / f"ct{classes}" / "predictions" / f"{tool.split()[0]}_{precision}_{mirroring}"
                shutil.rmtree(out, ignore_errors=True)
                print(f"[{key}] ...", flush=True)
                log = self.work / f"ct{classes}" / "logs" / f"{out.name}.log"
                cmd = self.command(tool, precision, mirroring, ckpt, image, out)
                try:
                    t = run_timed(cmd, log, env if tool != "medseg" else None, max_mib=a.max_gib * 1024)
                    row = {"seconds": t.seconds, "peak_mib": t.peak_mib, "masks": len(list(out.glob("*.nii.gz")))}
                except MemoryLimitExceeded as err:
                    row = {"seconds": err.seconds, "peak_mib": err.peak_mib, "stopped": f"over {a.max_gib:g} GiB"}
                self.results[key] = {**row, "load": open("/proc/loadavg").read().split()[0]}
                self.results_file.write_text(json.dumps(self.results, indent=1))
        return self.report()

    def report(self) -> list[dict]:
        a, rows = self.args, []
        for key, r in self.results.items():
            classes, tool, precision, mirroring = key.split("/")
            peer = self.results.get(f"{classes}/nnU-Net v2/fp32/{mirroring}", {})
            row = {"classes": int(classes), "tool": tool, "dtype": precision, "mirroring": mirroring}
            row.update({"s": r["seconds"], "peak RAM GiB": r["peak_mib"] / 1024, "note": r.get("stopped", "")})
            done = "stopped" not in r and "stopped" not in peer and peer
            row["s vs nnU-Net"] = r["seconds"] / peer["seconds"] if done else None
            row["RAM vs nnU-Net"] = r["peak_mib"] / peer["peak_mib"] if done else None
            rows.append(row)
        shape, spacing = "x".join(map(str, a.shape)), "x".join(f"{s:g}" for s in a.spacing)
        date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        head = f"CT {shape} voxels at {spacing} mm, one case; {cpu_name()} ({os.cpu_count()} cores); {date}"
        head += " (SMOKE: not a result)" if a.smoke else ""
        text = head + "\n\n" + markdown_table(rows)
        print(text)
        (self.work / "predict_speed.md").write_text(text + "\n")
        return rows


def main(argv: list[str] | None = None) -> list[dict]:
    return PredictSpeed(parse_args(argv)).run()


if __name__ == "__main__":
    main()
