"""What a crash-recovery checkpoint costs: time per checkpoint against the time of a training step, side by side.

    python benchmarks/checkpoint_cost.py --presets default hippocampus --steps 12 --saves 5

For each preset (the real config composed as `python -m medseg.train <preset overrides> +precision=mixed` would),
it trains `--steps` real steps (median step time after 3 warm-up steps), then times `trainer.save_checkpoint` into
the run's checkpoints folder `--saves` times (median) with medseg's AtomicCheckpointIO (write aside, fsync, rename,
folder fsync) and with Lightning's default TorchCheckpointIO. The last columns are a checkpoint in steps, and its
share of training time at the default interval (`callbacks.recovery_checkpoint`, 5 minutes).
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
from hydra import compose, initialize_config_dir
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import open_dict

from medseg import CONF_DIR
from medseg.reliability.atomic_io import AtomicCheckpointIO
from medseg.tracking.tables import markdown_table
from medseg.train import build, build_model, precision_kwargs

PRESETS = {
    "default": [],  # synthetic data, U-Net 16-256, 48^3 patches, batch 2 x 2 patches
    "hippocampus": ["experiment=hippocampus", "data.num_workers=0"],  # DynUNet, 40x56x40 patches, batch 4
}
INTERVAL_S = 300.0  # conf/callbacks/default.yaml: recovery_checkpoint.train_time_interval (5 min)


class StepClock(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self.started = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self.started)


def measure(preset: str, steps: int, saves: int, workdir: Path) -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*PRESETS[preset], "+precision=mixed", "logger=none"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(workdir / preset)
    pl.seed_everything(cfg.seed)
    datamodule = build(cfg.data)
    model = build_model(cfg, datamodule)
    clock = StepClock()
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, max_epochs=-1, logger=False, callbacks=[clock],
                         enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                         **precision_kwargs(cfg.get("precision")))  # fmt: skip
    trainer.fit(model, datamodule=datamodule)
    path = Path(cfg.paths.output_dir, "checkpoints", "recovery.ckpt")
    save_s = {}
    for name, io in (
        ("save, atomic + fsync (s)", AtomicCheckpointIO()),
        ("save, Lightning default (s)", TorchCheckpointIO()),
    ):
        trainer.strategy.checkpoint_io = io
        times = []
        for _ in range(saves):
            start = time.perf_counter()
            trainer.save_checkpoint(path)
            times.append(time.perf_counter() - start)
        save_s[name] = statistics.median(times)
    step_s, size_mb = statistics.median(clock.times[3:]), path.stat().st_size / 2**20
    return {"preset": preset, "step (s)": step_s, "checkpoint (MB)": size_mb, **save_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--saves", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(p, args.steps, args.saves, Path(tmp)) for p in args.presets]
    for row in rows:
        row["atomic save in steps"] = row["save, atomic + fsync (s)"] / row["step (s)"]
        row["share of training at one per 5 min"] = f"{row['save, atomic + fsync (s)'] / INTERVAL_S:.4%}"
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
