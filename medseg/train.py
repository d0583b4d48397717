"""Training entry point: `python -m medseg.train [+precision=mixed] [data=...] [key=value ...]`."""

import logging
from pathlib import Path

import hydra
import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console
from rich.table import Table

from medseg import CONF_DIR

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
    make_module = instantiate(cfg.model, _partial_=True)
    return make_module(label_names=datamodule.label_names, roi_size=list(datamodule.patch_size), inference=inference)


def instantiate_each(section: DictConfig | None) -> list:
    """Objects of a `name: {_target_: ...}` group; `name: null` switches one off (`callbacks.progress_bar=null`)."""
    return [instantiate(c) for c in (section or {}).values() if c is not None]


def precision_kwargs(cfg: DictConfig) -> dict:
    """Trainer kwargs for the chosen `+precision=`: either Lightning's own `precision=` or our plugin (never
    both: Lightning raises when given a precision and a precision plugin)."""
    prec = cfg.get("precision") or FP32
    if prec.get("plugin") is not None:
        return {"plugins": [instantiate(prec["plugin"])]}
    return {"precision": prec["lightning"]}


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """`ckpt_path=last`: the newest last.ckpt of any earlier run of this task."""
    if cfg.ckpt_path != "last":
        return cfg.ckpt_path
    candidates = sorted(
        Path(cfg.paths.log_dir, cfg.task_name).glob("**/checkpoints/last.ckpt"),
        key=lambda p: p.stat().st_mtime,
    )
    if not candidates:
        raise FileNotFoundError(f"ckpt_path=last: no last.ckpt under {Path(cfg.paths.log_dir, cfg.task_name)}")
    return str(candidates[-1])


def print_summary(trainer: pl.Trainer, model, output_dir: str, best_ckpt: str) -> None:
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    stage = "test" if "test/dice" in metrics else "val"
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
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = build_model(cfg, datamodule)
    callbacks, loggers = instantiate_each(cfg.get("callbacks")), instantiate_each(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **precision_kwargs(cfg))
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    trainer.fit(model, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg))
    best_ckpt = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    optimized = trainer.callback_metrics.get(cfg.optimized_metric)
    if cfg.optimized_metric.startswith("val/") and trainer.checkpoint_callback:
        best = trainer.checkpoint_callback.best_model_score
        optimized = best if best is not None else optimized
    if cfg.test:
        trainer.test(model, datamodule=datamodule, ckpt_path=best_ckpt or None)
    if trainer.is_global_zero:
        print_summary(trainer, model, cfg.paths.output_dir, best_ckpt)
    return float(optimized) if optimized is not None else None


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        return train(cfg)
    finally:
        # Multirun jobs share one process: without this every job logs into the first job's W&B run.
        import wandb

        wandb.finish()


if __name__ == "__main__":
    main()
