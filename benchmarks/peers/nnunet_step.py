"""nnU-Net's own training step, timed: run by step_speed.py with the peer venv's python (imports nnunetv2).

    <work>/venv/bin/python benchmarks/peers/nnunet_step.py <preprocessed dataset folder> --steps 10 --warmup 3

The real `nnUNetTrainer` of the plan's `3d_fullres` configuration (network, deep-supervision Dice + CE loss, SGD,
gradient clipping: `train_step` itself) on fixed random batches of the planned batch and patch, on the CPU in
FP32 (nnU-Net has no CPU autocast), threads as `nnUNetv2_train -device cpu` sets them. Prints one JSON line.
"""

import argparse
import json
import multiprocessing
import statistics
import time
from pathlib import Path

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


def planned_trainer(preprocessed: Path) -> tuple[nnUNetTrainer, dict]:
    """nnU-Net's own `nnUNetTrainer` of the folder's `3d_fullres` plan, initialised (network built, random
    weights), on the CPU; and the folder's dataset.json. Its output folder follows $nnUNet_results."""
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False  # nnU-Net 2.8's trainer pops it (run_training.py sets it)
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    trainer = nnUNetTrainer(plans, "3d_fullres", 0, dataset_json, device=torch.device("cpu"))
    trainer.initialize()
    return trainer, dataset_json


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("preprocessed", type=Path, help="nnUNet_preprocessed/DatasetXXX_Name")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(multiprocessing.cpu_count())  # what nnUNetv2_train -device cpu does
    trainer, dataset_json = planned_trainer(args.preprocessed)
    trainer.network.train()
    patch, batch = list(trainer.configuration_manager.patch_size), trainer.batch_size
    gen = torch.Generator().manual_seed(0)
    data = torch.randn([batch, trainer.num_input_channels, *patch], generator=gen)
    label = torch.randint(0, len(dataset_json["labels"]), [batch, 1, *patch], generator=gen).float()
    # deep supervision targets: the label at each output's scale, as nnU-Net's DownsampleSegForDSTransform makes
    scales = trainer._get_deep_supervision_scales()
    targets = [torch.nn.functional.interpolate(label, scale_factor=list(s), mode="nearest") for s in scales]
    times = []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        trainer.train_step({"data": data, "target": targets})
        times.append((time.perf_counter() - start) * 1000)
    steps = times[args.warmup :]
    print(json.dumps({"step_ms": statistics.median(steps), "step_times": steps, "patch": patch, "batch": batch}))


if __name__ == "__main__":
    main()
