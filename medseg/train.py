"""Training entry point: `python -m medseg.train [+precision=mixed] [data=...] [key=value ...]`."""

import logging
import math
import os
import shutil
import sys
from pathlib import Path

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console
from rich.table import Table

from medseg import CONF_DIR
from medseg.checkpoint import CheckpointError, load_checkpoint
from medseg.config_check import ConfigError, check_config, check_output_dir
from medseg.data.integrity import DatasetError
from medseg.planning.apply import planned_config
from medseg.precision.view import master_weights
from medseg.reliability.resume import newest_loadable
from medseg.tracking.loggers import make_loggers, redact
from medseg.tracking.summary import best_score
from medseg.tracking.sweep import write_job_result

log = logging.getLogger(__name__)

FP32 = {"name": "fp32", "lightning": "32-true"}


def build_model(cfg: DictConfig, datamodule) -> pl.LightningModule:
    """The LightningModule, with the net's channels (and DynUNet's spacing) taken from the data."""
    with open_dict(cfg):
        cfg.model.net.in_channels = datamodule.in_channels
        cfg.model.net.out_channels = datamodule.num_classes
        if "spacing" in cfg.model.net and cfg.model.net.spacing is None:
            cfg.model.net.spacing = list(datamodule.spacing)
    inference = {
        "net": OmegaConf.to_container(cfg.model.net, resolve=True),
        "spacing": list(datamodule.spacing),
        "modality": datamodule.modality,
        "patch_size": list(datamodule.patch_size),
        "ct_window": list(datamodule.ct_window),
        "label_names": datamodule.label_names,
    }
    # Partial, then called with plain Python values: kwargs merged into the config would come back as
    # ListConfig/DictConfig, which a weights_only checkpoint load refuses.
    make_module = build(cfg.model, _partial_=True)
    try:
        return make_module(
            label_names=datamodule.label_names, roi_size=list(datamodule.patch_size), inference=inference
        )
    except ValueError as err:  # a model.* value the module refuses: one line naming the key
        raise ConfigError(f"model.{err}") from None


def build(node: DictConfig, **kwargs):
    """`hydra.utils.instantiate`, except that a bad setting caught by the target (ValueError, a missing file)
    surfaces as itself rather than wrapped in Hydra's InstantiationException with the full traceback."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, ValueError | OSError):
            raise err.__cause__ from None
        raise


def instantiate_each(section: DictConfig | None) -> list:
    """Objects of a `name: {_target_: ...}` group; `name: null` switches one off (`callbacks.progress_bar=null`)."""
    return [instantiate(c) for c in (section or {}).values() if c is not None]


def precision_kwargs(prec: DictConfig | None) -> dict:
    """Trainer kwargs for a `conf/precision/*.yaml` node (None: fp32): either Lightning's own `precision=` or our
    plugin (never both: Lightning raises when given a precision and a precision plugin)."""
    prec = prec or FP32
    if prec.get("plugin") is not None:
        return {"plugins": [build(prec["plugin"])]}
    return {"precision": prec["lightning"]}


def resolve_ckpt_path(cfg: DictConfig, expected: dict) -> str | None:
    """`ckpt_path=last`: the newest checkpoint that loads in this run's own directory (a requeued job), else in
    any earlier run of this task; damaged ones are skipped and named, one for another model or dataset (its
    `inference` hyperparameters differ from `expected`) is refused. Checked before any training starts."""
    if cfg.ckpt_path is None:
        return None
    if cfg.ckpt_path != "last":
        load_checkpoint(cfg.ckpt_path)  # a missing, truncated or foreign file fails here, naming it
        return cfg.ckpt_path
    return str(newest_loadable([Path(cfg.paths.output_dir), Path(cfg.paths.log_dir, cfg.task_name)], expected))


def print_summary(trainer: pl.Trainer, model, output_dir: str, best_ckpt: str) -> None:
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    stage = "test" if "test/dice" in metrics else "val"
    # many-class runs log per-class values as a table, not keys (medseg.models.class_table): the module keeps them
    for key, values in model.per_class.items():
        metrics.update({f"{key}/{name}": v for name, v in zip(model.label_names[1:], values, strict=True)})
    table = Table(title=f"Validation split, best checkpoint ({stage} pass)")
    table.add_column("class")
    table.add_column("Dice", justify="right")
    if stage == "test":
        table.add_column("HD95 (mm)", justify="right")
    for name in model.label_names[1:]:
        row = [name, f"{metrics.get(f'{stage}/dice/{name}', float('nan')):.4f}"]
        if stage == "test":
            row.append(f"{metrics.get(f'test/hd95/{name}', float('nan')):.2f}")
        table.add_row(*row)
    mean = [f"{metrics.get(f'{stage}/dice', float('nan')):.4f}"]
    if stage == "test":
        mean.append(f"{metrics.get('test/hd95', float('nan')):.2f}")
    table.add_row("mean", *mean, style="bold")
    console = Console()
    console.print(table)
    # Plain print: paths must stay copy-pasteable, not wrapped to the terminal width.
    print(f"run directory:   {output_dir}")
    print(f"best checkpoint: {best_ckpt or '(none saved)'}")


def train(cfg: DictConfig) -> float | None:
    """Fit, test the best checkpoint, print the summary; returns `cfg.optimized_metric` for sweepers."""
    check_config(cfg)
    check_output_dir(cfg.paths.output_dir)
    fit = cfg.get("train", True)
    if not fit and not (cfg.ckpt_path and cfg.test):
        raise ConfigError("train=false tests a checkpoint: set ckpt_path=<file.ckpt> (or last) and keep test=true")
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = build(cfg.data)
    model = build_model(cfg, datamodule)
    ckpt_path = resolve_ckpt_path(cfg, model.hparams.inference)
    # make_loggers: W&B named after the Hydra job; a W&B failure warns and leaves the CSV logger
    callbacks, loggers = instantiate_each(cfg.get("callbacks")), make_loggers(cfg)
    kwargs = precision_kwargs(cfg.get("precision"))
    kwargs["plugins"] = [*kwargs.get("plugins", []), instantiate(cfg.checkpoint_io)]  # beside a precision plugin
    trainer = build(cfg.trainer, callbacks=callbacks, logger=loggers or False, **kwargs)
    if (plugin := master_weights(trainer)) is not None:
        plugin.check_plan(model)  # a plan naming modules the net lacks fails before any work
    for logger in trainer.loggers:
        logger.log_hyperparams(redact(OmegaConf.to_container(cfg, resolve=True)))

    try:
        if fit:
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except RuntimeError as err:
        # e.g. MasterWeightPrecision or NonFiniteLossGuard giving up on inf/NaN: where is a good state?
        ckpts = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
        saved = [p for c in ckpts for p in (c.last_model_path, c.best_model_path) if p]
        last_good = max((p for p in saved if os.path.isfile(p)), key=os.path.getmtime, default="")
        log.error("Training stopped at step %d: %s\nLast good checkpoint: %s", trainer.global_step, err,
                  last_good or "(none saved yet)")  # fmt: skip
        raise
    except SIGTERMException:
        saved = [c.ckpt_path for c in trainer.callbacks if isinstance(c, OnExceptionCheckpoint)]
        log.error(
            "Interrupted at step %d; checkpoint: %s. Resume with the same command plus ckpt_path=last",
            trainer.global_step,
            saved[0] if saved else "(none: no OnExceptionCheckpoint callback)",
        )
        raise SystemExit(143) from None  # 128 + SIGTERM, as a shell reports a terminated job
    best_ckpt = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if not fit:
        best_ckpt = ckpt_path
    optimized = best_score(trainer, cfg.optimized_metric)
    if cfg.test:
        trainer.test(model, datamodule=datamodule, ckpt_path=best_ckpt or None)
    if trainer.is_global_zero:
        print_summary(trainer, model, cfg.paths.output_dir, best_ckpt)
    write_job_result(cfg, trainer, optimized)
    return optimized


# Errors about the user's input, raised before training starts.
INPUT_ERRORS = (ConfigError, DatasetError, CheckpointError)


def discard_empty_run(output_dir: Path) -> None:
    """Remove a run directory that holds only what Hydra wrote at start (config, log): a run that never started
    should not sit among real runs, nor be picked up by `ckpt_path=last`."""
    hydra_only = {".hydra", "train.log", f"{HydraConfig.get().job.name}.log"}
    if output_dir.is_dir() and {p.name for p in output_dir.iterdir()} <= hydra_only:
        shutil.rmtree(output_dir, ignore_errors=True)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    import wandb

    try:
        optimized = train(planned_config(cfg))
    except Exception as error:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            if isinstance(error, INPUT_ERRORS):
                # A bad setting, dataset or checkpoint: the message names it; a traceback would only bury it.
                print(f"medseg: {error}", file=sys.stderr)
                discard_empty_run(Path(cfg.paths.output_dir))
                sys.exit(1)
            raise
        # One failed job must not end a sweep: logged, reported in the sweep summary, and None makes the Optuna
        # sweeper mark the trial failed (a NaN return would stop the whole study).
        log.exception(f"job failed, the sweep goes on: {error}")
        write_job_result(cfg, error=error)
        wandb.finish(exit_code=1)
        return None
    finally:
        # Multirun jobs share one process: without this every job logs into the first job's W&B run.
        wandb.finish()
    return None if optimized is not None and math.isnan(optimized) else optimized


if __name__ == "__main__":
    main()
