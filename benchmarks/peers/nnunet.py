"""medseg beside nnU-Net v2 on one MSD folder, the same split, the same machine and the same wall-clock budget.

    python benchmarks/peers/nnunet.py ../shared/data/Task04_Hippocampus --budget 30m --work peers/hippocampus
    python benchmarks/peers/nnunet.py ../shared/data/BraTS2018_WT_2mm --budget 9m --folds 5 --fold 0 --work peers/brats
    python benchmarks/peers/nnunet.py --smoke --work /tmp/peers_smoke      # synthetic data, a few steps, ~5 min

Each tool runs alone, one after the other (run the command alone on the machine):
1. nnU-Net (a pinned nnunetv2 in `<work>/venv`, torch's CPU wheel): `nnUNetv2_convert_MSD_dataset`, medseg's own
   train/validation split written as nnU-Net's `splits_final.json`, `nnUNetv2_plan_and_preprocess -c 3d_fullres`
   (timed), `nnUNetv2_train ... -tr nnUNetTrainerBudget -device cpu` (budget_trainer.py: nnUNetTrainer stopped at
   the budget, its poly LR fitted to it), `nnUNetv2_predict` with its default mirroring and `--disable_tta`.
2. medseg, planned (`data=msd plan=auto planner.time=<budget>`), `+precision=mixed` and `+precision=fp32`, then
   `python -m medseg.predict` with the planned mirroring (all axes) and `mirror_axes=[]`.
3. Both tools' masks scored by `medseg.evaluate` against the same labels; optionally (`--step-speed`) the training
   step of nnU-Net's planned network in both tools (step_speed.py).
Prints one table (Dice per class, HD95, train wall, predict s/case, peak RAM) and writes it as `<work>/peers.md`
and `<work>/peers.json`. Finished steps are kept in peers.json and skipped on a rerun (delete it to start over).
Wall times include each command's start-up (imports, model loading); RAM is the peak summed RSS of the process
tree (timed.py). medseg predicts without keep-largest-component (`postprocessing=none`), as nnUNetv2_predict does.
medseg preprocesses (and caches, one cache per mode) inside its budget; nnU-Net's preprocessing is timed apart.
nnU-Net predicts with its default checkpoint_final.pth, medseg with its run's best checkpoint (its default).
Both tools get `--workers` (default 2, one per core here) loader processes: nnU-Net's `nnUNet_n_proc_DA` (training
augmentation; its validation loader takes half), `-npp`/`-nps` of nnUNetv2_predict (its default, 3 and 3,
oversubscribes 2 cores), `-np` of conversion and preprocessing; medseg's `data.num_workers` and `num_workers`.
"""

import argparse
import json
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path

import nnunet_env
from report import print_report
from timed import run_timed

from medseg import REPO_ROOT
from medseg.data.datamodule import split_indices
from medseg.data.synthetic import write_synthetic_dataset
from medseg.evaluate import evaluate
from medseg.planning.auto import parse_duration

DATASET_ID = 990  # nnU-Net's id for the staged copy; every --work folder has its own nnU-Net folders
# Smoke: a few steps and cases. nnU-Net: 2 train + 1 val iterations an epoch, 2 epochs; medseg: 2 batches an epoch.
SMOKE_ITERATIONS, SMOKE_EPOCHS, SMOKE_CASES = "2,1", 2, 2
SMOKE_MEDSEG = ["trainer.max_epochs=2", "++trainer.limit_train_batches=2", "trainer.check_val_every_n_epoch=1"]
SMOKE_MEDSEG += ["planner.measure=false"]  # no calibration steps: the epochs are given
MEDSEG_MODES = {"mixed": "auto", "fp32": "fp32"}  # training precision -> medseg.predict dtype


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("msd", nargs="?", type=Path, help="MSD folder (dataset.json, imagesTr/, labelsTr/)")
    p.add_argument("--budget", default=None, help="training wall clock for each tool and mode (30m, 9m, 90s)")
    p.add_argument("--fold", type=int, default=0, help="with --folds: the fold to run")
    p.add_argument("--folds", type=int, default=None, help="k-fold split (data.num_folds); default medseg's hold-out")
    p.add_argument("--work", type=Path, default=Path("peers_work"), help="everything is written here")
    p.add_argument("--smoke", action="store_true", help="a few steps and cases (synthetic data without a folder)")
    p.add_argument("--cases", type=int, default=None, help="predict only the first N validation cases")
    p.add_argument("--workers", type=int, default=None, help="loader processes of both tools (default 2, smoke 1)")
    p.add_argument("--tools", nargs="+", default=["nnunet", "medseg-mixed", "medseg-fp32"])
    p.add_argument("--step-speed", action="store_true", help="also time the training step (step_speed.py)")
    p.add_argument("--nnunet-version", default=nnunet_env.NNUNET_VERSION)
    p.add_argument("--venv", type=Path, default=None, help="the peer virtual environment; default <work>/venv")
    args = p.parse_args(argv)
    if args.msd is None and not args.smoke:
        p.error("an MSD folder is needed (only --smoke writes a synthetic one)")
    if args.folds is not None and not 0 <= args.fold < args.folds:
        p.error(f"--fold must be in [0, --folds={args.folds}), got {args.fold}")
    if args.smoke:
        args.cases = args.cases or SMOKE_CASES
    args.budget = args.budget or ("2m" if args.smoke else "30m")
    args.workers = args.workers if args.workers is not None else (1 if args.smoke else 2)
    return args


def stage_msd(msd: Path, work: Path) -> Path:
    """`<work>/msd/Task990_<Name>`: links to the folder's images and labels under the name nnU-Net's converter
    parses (`Task<id>_<Name>`, one underscore), an imagesTs/ and a `test` list it requires."""
    meta = json.loads((msd / "dataset.json").read_text())
    name = "".join(c for c in str(meta.get("name") or msd.name) if c.isalnum()) or "Dataset"
    staged = work / "msd" / f"Task{DATASET_ID}_{name}"
    if not staged.is_dir():
        staged.mkdir(parents=True)
        for sub in ("imagesTr", "labelsTr"):
            (staged / sub).symlink_to((msd / sub).resolve())
        (staged / "imagesTs").mkdir()
        (staged / "dataset.json").write_text(json.dumps({**meta, "test": []}, indent=1))
    return staged


def cpu_name() -> str:
    return next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")


def case_id(path: str) -> str:
    return Path(path).name.removesuffix(".gz").removesuffix(".nii")


def medseg_split(msd: Path, folds: int | None) -> list[dict]:
    """medseg's split (data.seed, data.val_fraction of `conf/`, `split_indices`), as nnU-Net's splits_final.json:
    one entry for the hold-out split, or one per fold."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["data=msd", f"data.root={msd}"])
    items = json.loads((msd / "dataset.json").read_text())["training"]
    ids = [case_id(item["image"]) for item in items]
    splits = []
    for fold in range(folds or 1):
        train, val = split_indices(len(ids), int(cfg.data.seed), float(cfg.data.val_fraction), fold, folds)
        splits.append({"train": [ids[i] for i in train], "val": [ids[i] for i in val]})
    return splits


def link_cases(src: Path, ids: list[str], dest: Path, suffixes: list[str]) -> Path:
    """`dest/` holding links to `src/<id><suffix>` for each id and suffix (nnU-Net's channels: _0000, _0001...)."""
    if dest.is_dir():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for i in ids:
        for suffix in suffixes:
            (dest / f"{i}{suffix}").symlink_to((src / f"{i}{suffix}").resolve())
    return dest


class Comparison:
    """The steps of one fold; each result lands in `<work>/peers.json` as soon as it is measured."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.work = args, args.work.resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.budget = parse_duration(args.budget)
        if args.msd is None:
            args.msd = self.work / "data" / "Task01_Synthetic"
            if not (args.msd / "dataset.json").is_file():
                write_synthetic_dataset(args.msd, num_cases=8, min_size=28, max_size=32)
        self.msd = args.msd.resolve()
        self.meta = json.loads((self.msd / "dataset.json").read_text())
        self.results_file = self.work / "peers.json"
        self.results = json.loads(self.results_file.read_text()) if self.results_file.is_file() else {}
        self.results.setdefault("setup", {}).update(self.setup_facts())
        self.fold_key = f"fold{args.fold}" if args.folds else "holdout"
        self.fold = self.results.setdefault("folds", {}).setdefault(self.fold_key, {})
        self.venv = (args.venv or self.work / "venv").resolve()
        self.env = {
            "nnUNet_raw": str(self.work / "nnUNet_raw"),
            "nnUNet_preprocessed": str(self.work / "nnUNet_preprocessed"),
            "nnUNet_results": str(self.work / "nnUNet_results"),
            "nnUNet_n_proc_DA": str(args.workers),
            "nnUNet_def_n_proc": str(args.workers),
        }
        self.dataset = None  # DatasetXXX_Name, after conversion

    def setup_facts(self) -> dict:
        return {
            "msd": str(self.args.msd),
            "budget": self.args.budget,
            "smoke": self.args.smoke,
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "nnunetv2": self.args.nnunet_version,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }

    def save(self) -> None:
        self.results_file.write_text(json.dumps(self.results, indent=1))

    def step(self, tool: str, name: str, run) -> dict:
        """`run()` once per fold: its dict is stored under fold/tool/name and returned again on a rerun."""
        done = self.fold.setdefault(tool, {})
        if name not in done:
            print(f"[{tool}] {name} ...", flush=True)
            done[name] = run()
            self.save()
        return done[name]

    # nnU-Net -----------------------------------------------------------------------------------------------
    def nnunet(self, val_ids: list[str], splits: list[dict]) -> None:
        a, env, logs = self.args, self.env, self.work / "logs"
        nnunet_env.install(self.venv, a.nnunet_version, log=logs / "install.log")
        staged = stage_msd(self.msd, self.work)
        self.dataset = f"Dataset{DATASET_ID:03d}_{staged.name.split('_', 1)[1]}"
        raw = Path(env["nnUNet_raw"]) / self.dataset
        if not (raw / "dataset.json").is_file():
            convert = [nnunet_env.tool(self.venv, "nnUNetv2_convert_MSD_dataset"), "-i", str(staged)]
            run_timed(convert + ["-np", str(a.workers)], logs / "nnunet_convert.log", env)
        preprocessed = Path(env["nnUNet_preprocessed"]) / self.dataset

        def preprocess() -> dict:
            cmd = [nnunet_env.tool(self.venv, "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID)]
            t = run_timed(cmd + ["-c", "3d_fullres", "-np", str(a.workers)], logs / "nnunet_preprocess.log", env)
            return {"seconds": t.seconds, "peak_mib": t.peak_mib}

        if "nnunet_preprocess" not in self.results:  # once for every fold
            self.results["nnunet_preprocess"] = preprocess()
            self.save()
        (preprocessed / "splits_final.json").write_text(json.dumps(splits, indent=1))
        fold = str(a.fold if a.folds else 0)
        trainer = ["-tr", nnunet_env.TRAINER]

        def train() -> dict:
            run_env = {**env, "MEDSEG_PEER_DEADLINE": str(time.time() + self.budget)}
            if a.smoke:
                run_env.update(MEDSEG_PEER_ITERATIONS=SMOKE_ITERATIONS, MEDSEG_PEER_MAX_EPOCHS=str(SMOKE_EPOCHS))
            cmd = [nnunet_env.tool(self.venv, "nnUNetv2_train"), str(DATASET_ID), "3d_fullres", fold, *trainer]
            t = run_timed(cmd + ["-device", "cpu"], logs / f"nnunet_train_{self.fold_key}.log", run_env)
            out = Path(env["nnUNet_results"]) / self.dataset / f"{nnunet_env.TRAINER}__nnUNetPlans__3d_fullres"
            budget = json.loads((out / f"fold_{fold}" / "budget.json").read_text())
            return {"seconds": t.seconds, "peak_mib": t.peak_mib, **budget}

        self.step("nnunet", "train", train)
        channels = [f"_{c:04d}.nii.gz" for c in range(len(self.meta["modality"]))]
        inputs = link_cases(raw / "imagesTr", val_ids, self.work / "cases" / "nnunet_images", channels)
        for tta, extra in (("mirror", []), ("none", ["--disable_tta"])):
            out = self.work / "predictions" / self.fold_key / f"nnunet_{tta}"

            def predict(out=out, extra=extra, tta=tta) -> dict:
                shutil.rmtree(out, ignore_errors=True)
                cmd = [nnunet_env.tool(self.venv, "nnUNetv2_predict"), "-i", str(inputs), "-o", str(out)]
                cmd += ["-d", str(DATASET_ID), "-c", "3d_fullres", "-f", fold, *trainer, "-device", "cpu", *extra]
                cmd += ["-npp", str(a.workers), "-nps", str(a.workers)]  # as medseg.predict's num_workers
                t = run_timed(cmd, logs / f"nnunet_predict_{self.fold_key}_{tta}.log", env)
                return {"seconds": t.seconds, "s_per_case": t.seconds / len(val_ids), "peak_mib": t.peak_mib}

            self.step("nnunet", f"predict_{tta}", predict)
            self.step("nnunet", f"score_{tta}", lambda out=out: self.score(out))

    # medseg ------------------------------------------------------------------------------------------------
    def medseg(self, mode: str, val_ids: list[str]) -> None:
        a, logs = self.args, self.work / "logs"
        tool, run_dir = f"medseg-{mode}", self.work / "medseg" / self.fold_key / mode
        py = [sys.executable, "-m"]

        def train() -> dict:
            shutil.rmtree(run_dir, ignore_errors=True)
            cmd = py + ["medseg.train", "data=msd", f"data.root={self.msd}", "plan=auto", f"planner.time={a.budget}"]
            cmd += [f"+precision={mode}", "logger=csv", f"hydra.run.dir={run_dir}", f"data.num_workers={a.workers}"]
            cmd += [f"data.cache_dir={self.work / 'medseg' / f'cache_{mode}'}"]  # each mode caches in its budget
            if a.folds:
                cmd += [f"data.num_folds={a.folds}", f"data.fold={a.fold}"]
            t = run_timed(cmd + (SMOKE_MEDSEG if a.smoke else []), logs / f"{tool}_train_{self.fold_key}.log")
            return {"seconds": t.seconds, "peak_mib": t.peak_mib}

        self.step(tool, "train", train)
        images = self.msd / "imagesTr"
        inputs = link_cases(images, val_ids, self.work / "cases" / "medseg_images", [".nii.gz"])
        for tta, mirror in (("mirror", []), ("none", ["mirror_axes=[]"])):
            out = self.work / "predictions" / self.fold_key / f"{tool}_{tta}"

            def predict(out=out, mirror=mirror, tta=tta) -> dict:
                shutil.rmtree(out, ignore_errors=True)
                cmd = py + ["medseg.predict", f"ckpt_path={run_dir}", f"input={inputs}", f"output={out}"]
                cmd += [f"dtype={MEDSEG_MODES[mode]}", "postprocessing=none", "progress=false", *mirror]
                cmd += [f"num_workers={a.workers}", f"hydra.run.dir={out.parent / ('hydra_' + out.name)}"]
                t = run_timed(cmd, logs / f"{tool}_predict_{self.fold_key}_{tta}.log")
                return {"seconds": t.seconds, "s_per_case": t.seconds / len(val_ids), "peak_mib": t.peak_mib}

            self.step(tool, f"predict_{tta}", predict)
            self.step(tool, f"score_{tta}", lambda out=out: self.score(out))

    def score(self, pred_dir: Path) -> dict:
        """medseg.evaluate's per-class means over the predicted cases (one evaluator for both tools)."""
        labels = self.msd / "labelsTr"
        names = [self.meta["labels"][k] for k in sorted(self.meta["labels"], key=int)]
        return evaluate(pred_dir, labels, pred_dir.parent / f"{pred_dir.name}.csv", names)

    def run(self) -> dict:
        a = self.args
        splits = medseg_split(self.msd, a.folds)
        val_ids = splits[a.fold if a.folds else 0]["val"][: a.cases]
        self.fold["val_cases"] = val_ids
        self.save()
        if "nnunet" in a.tools:
            self.nnunet(val_ids, splits)
        for mode in MEDSEG_MODES:
            if f"medseg-{mode}" in a.tools:
                self.medseg(mode, val_ids)
        if a.step_speed and "nnunet" in a.tools:
            import step_speed

            argv = ["--work", str(self.work), "--venv", str(self.venv)] + (["--smoke"] if a.smoke else [])
            self.results["step_speed"] = step_speed.main(argv)
            self.save()
        print_report(self.results, self.work)
        return self.results


def main(argv: list[str] | None = None) -> dict:
    warnings.filterwarnings("ignore", category=FutureWarning)  # MONAI's deprecation notes inside medseg.evaluate
    return Comparison(parse_args(argv)).run()


if __name__ == "__main__":
    main()
