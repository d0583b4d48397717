"""Weights & Biases loggers that cannot stop training, and the run's identity from the Hydra job.

W&B is offline by default (`conf/logger/wandb.yaml`); `logger=wandb_online` with `WANDB_API_KEY` set uploads
live. Whatever goes wrong with W&B (no network, a bad key, a full disk, `wandb.init` raising) is warned about
once and the run goes on with the CSV logger, which `make_loggers` always keeps beside W&B.

The leaf of `medseg.tracking`: no medseg imports, so any module may log through it.
"""

import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.utils import get_class, instantiate
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

SECRET_ENV_VARS = ("WANDB_API_KEY",)
MAX_NAME_LEN = 128  # W&B truncates longer display names anyway


def redact(value: Any) -> Any:
    """``value`` (nested dicts/lists/strings) with the text of every secret environment variable replaced by
    ``***``, so a config that interpolated one (``${oc.env:WANDB_API_KEY}``) never reaches a log."""
    secrets = [os.environ[k] for k in SECRET_ENV_VARS if os.environ.get(k)]
    if not secrets:
        return value

    def scrub(v: Any) -> Any:
        if isinstance(v, str):
            for s in secrets:
                v = v.replace(s, "***")
            return v
        if isinstance(v, dict):
            return {k: scrub(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(scrub(x) for x in v)
        return v

    return scrub(value)


class SafeWandbLogger(WandbLogger):
    """Lightning's WandbLogger whose failures are never fatal: the first exception from W&B is warned about
    and the logger goes quiet for the rest of the run (the CSV logger beside it keeps everything).

    Same arguments as ``WandbLogger``; hyper-parameters are passed through ``redact``.
    """

    broken = False

    def _guard(self, what: str, fn: Callable[[], Any]) -> Any:
        if self.broken:
            return None
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - any W&B failure must leave training running
            self.broken = True
            warnings.warn(
                f"W&B failed ({what}: {type(err).__name__}: {redact(str(err))}); W&B logging is off for the rest"
                " of this run, metrics go on to the other loggers (csv/metrics.csv).",
                stacklevel=3,
            )
            return None

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        if isinstance(params, dict):
            params = redact(params)
        self._guard("log_hyperparams", lambda: super(SafeWandbLogger, self).log_hyperparams(params))

    @rank_zero_only
    def log_metrics(self, metrics: Any, step: int | None = None) -> None:
        self._guard("log_metrics", lambda: super(SafeWandbLogger, self).log_metrics(metrics, step))

    @rank_zero_only
    def log_table(self, *args: Any, **kwargs: Any) -> None:
        self._guard("log_table", lambda: super(SafeWandbLogger, self).log_table(*args, **kwargs))

    @rank_zero_only
    def log_image(self, *args: Any, **kwargs: Any) -> None:
        self._guard("log_image", lambda: super(SafeWandbLogger, self).log_image(*args, **kwargs))

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self._guard(
            "after_save_checkpoint", lambda: super(SafeWandbLogger, self).after_save_checkpoint(checkpoint_callback)
        )

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self._guard("finalize", lambda: super(SafeWandbLogger, self).finalize(status))

    @rank_zero_only
    def log_data(self, data: dict[str, Any], step: int | None = None) -> None:
        """``run.log(data)`` with ``trainer/global_step`` set: media, histograms, charts."""
        if step is not None:
            data = {**data, "trainer/global_step": step}
        self._guard("log", lambda: self.experiment.log(data))

    @rank_zero_only
    def update_summary(self, values: dict[str, Any]) -> None:
        self._guard("summary", lambda: self.experiment.summary.update(values))


def log_to_wandb(logger: WandbLogger, data: dict[str, Any], step: int | None = None) -> None:
    """Log media/charts through ``logger``; a plain WandbLogger gets the same never-fatal treatment."""
    if isinstance(logger, SafeWandbLogger):
        logger.log_data(data, step)
        return
    try:
        logger.experiment.log({**data, "trainer/global_step": step} if step is not None else data)
    except Exception as err:  # noqa: BLE001
        warnings.warn(f"W&B log failed ({type(err).__name__}: {redact(str(err))}); skipped", stacklevel=2)


def wandb_loggers(trainer: pl.Trainer) -> list[WandbLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger) and not getattr(lg, "broken", False)]


# ---------------------------------------------------------------------------------------------- run identity
def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """W&B ``name``, ``group``, ``tags`` and ``job_type`` of this Hydra job.

    A single run: group ``<task_name>``, name ``<run dir name> <overrides>``. A multirun: the whole sweep is one
    group ``<task_name>-<sweep dir name>``, each job named ``<job num>: <overrides>``, job type
    ``<task_name>-sweep``. Tags: ``cfg.tags`` plus the precision, model and dataset. Outside a Hydra app
    (tests, notebooks) the output folder's name stands in for the run dir.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    task = str(cfg.get("task_name", "train"))
    prec = (cfg.get("precision") or {}).get("name", "fp32")
    net = str(OmegaConf.select(cfg, "model.net._target_", default="") or "").rsplit(".", 1)[-1]
    data = Path(str(OmegaConf.select(cfg, "data.root", default="") or "")).name
    tags = [*(cfg.get("tags") or []), f"precision={prec}"]
    tags += [f"model={net}"] if net else []
    tags += [f"data={data}"] if data else []
    output_dir = Path(str(OmegaConf.select(cfg, "paths.output_dir", default=".")))
    name, group, job_type = output_dir.name, task, task
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        overrides = hc.job.override_dirname
        if hc.mode == RunMode.MULTIRUN:
            group = f"{task}-{Path(hc.sweep.dir).name}"
            name = f"{hc.job.num}: {overrides}" if overrides else str(hc.job.num)
            job_type = f"{task}-sweep"
            tags.append("multirun")
        elif overrides:
            name = f"{name} {overrides}"
    return {"name": name[:MAX_NAME_LEN], "group": group, "tags": list(dict.fromkeys(tags)), "job_type": job_type}


def define_metrics(run: Any) -> None:
    """One x-axis for every panel (``trainer/global_step``, so precision events line up with loss and Dice), and
    the summary aggregations the runs table shows."""
    run.define_metric("trainer/global_step")
    run.define_metric("epoch", step_metric="trainer/global_step")
    for glob in ("train/*", "val/*", "test/*", "precision/*", "lr-*"):
        run.define_metric(glob, step_metric="trainer/global_step", step_sync=True)
    run.define_metric("val/dice", step_metric="trainer/global_step", summary="max,last")
    run.define_metric("train/loss", step_metric="trainer/global_step", summary="min,last")
    run.define_metric("precision/loss_scale", step_metric="trainer/global_step", summary="last,min")
    run.define_metric("precision/skipped_steps", step_metric="trainer/global_step", summary="last")
    run.define_metric("precision/peak_memory_mb", step_metric="trainer/global_step", summary="max")
    run.define_metric("precision/step_time", step_metric="trainer/global_step", summary="mean")


def make_loggers(cfg: DictConfig) -> list[Logger]:
    """The loggers of ``cfg.logger`` (``name: {_target_: ...}``; ``null`` entries skipped).

    A W&B logger gets its identity from the Hydra job (config values that are set win) and is started here, so
    a failing ``wandb.init`` is caught now: it is warned about once and dropped. Whenever W&B is configured a
    CSV logger is kept beside it (added at ``<output_dir>/csv`` if the config has none), so the run's metrics
    are on disk whatever happens to W&B.
    """
    loggers: list[Logger] = []
    wants_wandb = False
    for key, spec in (cfg.get("logger") or {}).items():
        if spec is None:
            continue
        if not issubclass(get_class(spec._target_), WandbLogger):
            loggers.append(instantiate(spec))
            continue
        wants_wandb = True
        if os.environ.get("WANDB_MODE") == "disabled":
            # Lightning's offline=True would override it with "dryrun"; the user asked for no W&B at all
            log.info("WANDB_MODE=disabled: no W&B logger (logger.%s skipped)", key)
            continue
        derived = run_identity(cfg)
        identity = {k: v for k, v in derived.items() if spec.get(k) is None}
        # a requeued (preempted) SLURM job runs again in the same output dir: continue its W&B run
        latest = Path(cfg.paths.output_dir, "wandb", "latest-run")
        if spec.get("id") is None and latest.exists():
            identity.update(id=latest.resolve().name.rsplit("-", 1)[-1], resume="allow")
        if spec.get("tags") is not None:
            identity["tags"] = list(dict.fromkeys([*spec.tags, *derived["tags"]]))
        try:
            logger = instantiate(spec, **identity)
            run = logger.experiment  # wandb.init: where a bad key, no network or a full disk shows up
            if rank_zero_only.rank == 0:
                define_metrics(run)
        except Exception as err:  # noqa: BLE001 - training must go on without W&B
            warnings.warn(
                f"W&B could not start (logger.{key}: {type(err).__name__}: {redact(str(err))}); this run logs to"
                " CSV only (csv/metrics.csv).",
                stacklevel=2,
            )
            _finish_quietly()
            continue
        loggers.append(logger)
    if wants_wandb and not any(isinstance(lg, CSVLogger) for lg in loggers):
        loggers.append(CSVLogger(save_dir=cfg.paths.output_dir, name="csv", version=""))
    return loggers


def _finish_quietly() -> None:
    try:
        import wandb

        wandb.finish(exit_code=1)
    except Exception:  # noqa: BLE001
        pass
