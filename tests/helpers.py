"""Test-only callbacks, importable by `_target_` from a subprocess run (`tests.helpers.X`)."""

import time
from pathlib import Path

import lightning.pytorch as pl


class StepFile(pl.Callback):
    """Writes the global step to `path` after every training batch, then sleeps `sleep` seconds, so a test
    can send a signal while training is certainly in progress."""

    def __init__(self, path: str, sleep: float = 0.0) -> None:
        self.path, self.sleep = Path(path), sleep

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.path.write_text(str(trainer.global_step))
        time.sleep(self.sleep)
