"""Training step speed at the same network, patch and batch: nnU-Net's plan for a folder, in nnU-Net and in medseg.

    python benchmarks/peers/step_speed.py --work peers/hippocampus        # after nnunet.py has planned the folder
    python benchmarks/peers/step_speed.py --work /tmp/peers_smoke --smoke

Reads `<work>/nnUNet_preprocessed/Dataset*/nnUNetPlans.json` (3d_fullres: patch, batch, kernels, strides,
features per stage) and times, one after the other in this one run:
- nnU-Net fp32: its own `nnUNetTrainer.train_step` (nnunet_step.py in the peer venv; nnU-Net has no CPU autocast);
- medseg fp32 and `mixed`: a MONAI DynUNet with the plan's kernels, strides and filters inside medseg's
  SegmentationModule (deep supervision, DiceCE, AdamW as `model=dynunet`), stepped by the real Lightning Trainer
  with `+precision=fp32|mixed` (StepTimer of benchmarks/precision.py).
Data are fixed random batches on both sides (no loader). Ratios are step time against nnU-Net fp32's.
"""

import argparse
import importlib.util
import json
import os
import subprocess
from pathlib import Path

import nnunet_env
import torch
from report import step_table

from medseg import REPO_ROOT
from medseg.models.module import SegmentationModule


def _precision_bench():
    """benchmarks/precision.py (a script folder, not a package): its StepTimer, FixedBatches, precision_kwargs."""
    spec = importlib.util.spec_from_file_location("bench_precision", REPO_ROOT / "benchmarks" / "precision.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def nnunet_plan(work: Path) -> tuple[Path, dict, dict]:
    """(preprocessed folder, its 3d_fullres configuration, its dataset.json)."""
    found = sorted((work / "nnUNet_preprocessed").glob("Dataset*/nnUNetPlans.json"))
    if not found:
        raise FileNotFoundError(f"{work}/nnUNet_preprocessed: no nnUNetPlans.json; run nnunet.py --work {work} first")
    folder = found[0].parent
    plans = json.loads(found[0].read_text())
    return folder, plans["configurations"]["3d_fullres"], json.loads((folder / "dataset.json").read_text())


def medseg_step(config: dict, dataset: dict, mode: str, steps: int, warmup: int) -> dict:
    """Median step of nnU-Net's planned network rebuilt as a DynUNet, in medseg at `mode`."""
    import lightning.pytorch as pl
    from hydra.utils import instantiate
    from monai.networks.nets import DynUNet

    bench = _precision_bench()
    arch = config["architecture"]["arch_kwargs"]
    patch, batch = list(config["patch_size"]), int(config["batch_size"])
    classes, channels = len(dataset["labels"]), len(dataset["channel_names"])
    strides = [list(s) for s in arch["strides"]]
    net = DynUNet(
        spatial_dims=3,
        in_channels=channels,
        out_channels=classes,
        kernel_size=[list(k) for k in arch["kernel_sizes"]],
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=list(arch["features_per_stage"]),
        norm_name="instance",
        deep_supervision=True,
        deep_supr_num=len(strides) - 2,  # an output at every decoder level but the lowest, as nnU-Net's
    )
    cfg = bench.model_config("dynunet")
    loss, optimizer, scheduler = instantiate(cfg.loss), instantiate(cfg.optimizer), instantiate(cfg.scheduler)
    names = [str(i) for i in range(classes)]
    module = SegmentationModule(
        net, loss, optimizer, scheduler, label_names=names, roi_size=patch, channels_last=cfg.channels_last
    )
    gen = torch.Generator().manual_seed(0)
    batches = [
        {
            "image": torch.randn([batch, channels, *patch], generator=gen),
            "label": torch.randint(0, classes, [batch, 1, *patch], generator=gen),
        }
    ]
    timer = bench.StepTimer(warmup=warmup)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=warmup + steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        gradient_clip_val=12.0,  # as conf/trainer/default.yaml and nnU-Net (clip_grad_norm_ 12)
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        **bench.precision_kwargs(mode, "cpu"),
    )
    loader = torch.utils.data.DataLoader(bench.FixedBatches(batches, warmup + steps), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    return {"step_ms": timer.result["step_ms"], "step_times": timer.result["step_times"]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="nnunet.py's --work folder (peer venv and nnU-Net plan)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="2 steps after 1 warm-up")
    p.add_argument("--venv", type=Path, default=None, help="the peer virtual environment; default <work>/venv")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup = 2, 1
    work = args.work.resolve()
    folder, config, dataset = nnunet_plan(work)
    env_py = str(nnunet_env.venv_python(args.venv or work / "venv"))
    script = str(Path(__file__).with_name("nnunet_step.py"))
    out = subprocess.run(
        [env_py, script, str(folder), "--steps", str(args.steps), "--warmup", str(args.warmup)],
        env={
            **os.environ,
            "nnUNet_preprocessed": str(folder.parent),
            "nnUNet_results": str(work / "step_speed" / "nnUNet_results"),
            "nnUNet_raw": str(work / "nnUNet_raw"),
        },
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    nnunet = json.loads(out.strip().splitlines()[-1])
    rows = [{"tool": "nnU-Net v2", "precision": "fp32", "step_ms": nnunet["step_ms"]}]
    for mode in ("fp32", "mixed"):
        step = medseg_step(config, dataset, mode, args.steps, args.warmup)
        rows.append({"tool": "medseg", "precision": mode, **step})
    for row in rows:
        row["ratio"] = row["step_ms"] / nnunet["step_ms"]
    arch = config["architecture"]["arch_kwargs"]
    result = {
        "patch": "x".join(str(s) for s in config["patch_size"]),
        "batch": config["batch_size"],
        "net": f"{arch['n_stages']} stages, filters {arch['features_per_stage']}, strides {arch['strides']}",
        "steps": args.steps,
        "rows": rows,
    }
    print(step_table(result))
    (work / "step_speed.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
