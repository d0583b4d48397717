"""Test helpers: running the CLI in a subprocess, and callbacks and plugins importable by `_target_` from such a
run (`tests.helpers.X`)."""

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from medseg.reliability.atomic_io import AtomicCheckpointIO

# Small enough for a few seconds of CPU per run: 32^3 patches, 8-16-32 U-Net.
TINY = [
    "logger=csv",
    "trainer.accelerator=cpu",
    "trainer.max_epochs=2",
    "trainer.check_val_every_n_epoch=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "++callbacks.progress_bar=null",
    "data.patch_size=[32,32,32]",
    "data.num_workers=0",
    "data.batch_size=2",
    "data.num_samples=1",
]
TINY_UNET = ["model.net.channels=[8,16,32]", "model.net.strides=[2,2]", "model.net.num_res_units=1"]


def on_dataset(dataset: Path, cache_dir: Path) -> list[str]:
    """Overrides that train on an existing MSD folder (no synthesis) with its cache in `cache_dir`."""
    return [f"data.root={dataset}", "++data.synthesize=null", f"data.cache_dir={cache_dir}"]


def cli(*args: str | Path, module: str = "medseg.train") -> list[str]:
    """The command line `python -m <module> <args>` with this interpreter."""
    return [sys.executable, "-m", module, *map(str, args)]


def run_cli(
    *args: str | Path,
    module: str = "medseg.train",
    env: dict[str, str] | None = None,
    timeout: float = 300,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    """Run `python -m <module> <args>` to the end; `env` adds to this process' environment. The caller checks
    the return code (with the output in its assertion message: `output(result)`)."""
    return subprocess.run(
        cli(*args, module=module),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def output(result: subprocess.CompletedProcess, tail: int = 3000) -> str:
    """The end of a finished run's stdout and stderr, for assertion messages."""
    return f"stdout:\n{result.stdout[-tail:]}\nstderr:\n{result.stderr[-tail:]}"


class StepFile(pl.Callback):
    """Writes the global step to `path` after every training batch, then sleeps `sleep` seconds, so a test
    can send a signal while training is certainly in progress."""

    def __init__(self, path: str, sleep: float = 0.0) -> None:
        self.path, self.sleep = Path(path), sleep

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.path.write_text(str(trainer.global_step))
        time.sleep(self.sleep)


class SlowCheckpointIO(AtomicCheckpointIO):
    """Writes the first half of each checkpoint, creates `marker`, sleeps `sleep` seconds, then writes the rest
    and removes `marker`: a test can kill the process while a checkpoint is half written."""

    def __init__(self, marker: str, sleep: float = 0.3) -> None:
        super().__init__()
        self.marker, self.sleep = Path(marker), sleep

    def write(self, checkpoint: dict, f) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        self.marker.write_text(f.name)
        time.sleep(self.sleep)
        f.write(data[len(data) // 2 :])
        self.marker.unlink()
