"""Ctrl-C and SIGTERM stop training at the next step boundary, with a checkpoint to resume from."""

import signal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn


class GracefulInterrupt(pl.Callback):
    """The first Ctrl-C asks Lightning to stop the way it does on SIGTERM: after the current optimizer step,
    raising `SIGTERMException`, so `OnExceptionCheckpoint` saves a consistent state (a KeyboardInterrupt could
    land between the master step and the copy back into the model). A second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self._previous = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        def handler(signum, frame):
            if trainer.received_sigterm:
                raise KeyboardInterrupt
            rank_zero_warn("Interrupted: stopping after this step and saving a checkpoint (Ctrl-C again to abort)")
            # `Trainer.received_sigterm` is read-only; its signal connector holds the flag the loops check.
            trainer._signal_connector.received_sigterm = True

        try:
            self._previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread (e.g. a notebook executor): keep the default behaviour
            self._previous = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.teardown(trainer, pl_module, "fit")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
