"""The project's W&B workspace, made at the end of training (`callbacks.wandb_workspace`)."""

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only

from medseg.tracking.dashboard import WORKSPACE_NAME, workspace
from medseg.tracking.loggers import wandb_loggers
from medseg.tracking.views import WORKSPACE_FILE, OnceWarner, save_workspace, workspace_json, write_spec


class WandbWorkspace(pl.Callback):
    """At the end of training, for a W&B run: the workspace of its project (`medseg.tracking.dashboard`), written
    into the run directory as `wandb_workspace.json` and, for an online run, created or updated on the server (by
    name, so every run refreshes the same one). An offline run's spec is saved after `wandb sync` with
    `python -m medseg.dashboard <run dir> --entity E`. A missing `wandb-workspaces` or a failing save is warned
    about once and never stops training.

    Args:
        output_dir: the run directory the spec is written into.
        name: the workspace's name in the project.
        save: save on the server: null = when the W&B run is online.
    """

    def __init__(self, output_dir: str, name: str = WORKSPACE_NAME, save: bool | None = None) -> None:
        self.path = Path(output_dir) / WORKSPACE_FILE
        self.name, self.save = name, save
        self.warn = OnceWarner()
        self.url: str | None = None  # where it was saved

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loggers = wandb_loggers(trainer)
        if not loggers:
            return
        datamodule = getattr(trainer, "datamodule", None)
        label_names = getattr(datamodule, "label_names", None) or getattr(pl_module, "label_names", [])
        try:
            run = loggers[0].experiment
            space = workspace(run.entity or "", run.project, label_names, self.name)
            write_spec(self.path, workspace_json(space))
        except Exception as err:  # noqa: BLE001 - a dashboard must never stop training
            self.warn("building the workspace", err)
            return
        if self.save if self.save is not None else not run.offline:
            try:
                self.url = save_workspace(space)
            except Exception as err:  # noqa: BLE001
                self.warn(f"saving workspace {self.name!r} to {run.entity}/{run.project}", err)
