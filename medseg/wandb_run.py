"""Weights & Biases around a training run: loggers that cannot stop training, run identity from the Hydra job,
metric axes, the end-of-run summary and loss-scale chart, and a reader for the offline run files.

W&B is offline by default (`conf/logger/wandb.yaml`); `logger=wandb_online` with `WANDB_API_KEY` set uploads
live. Whatever goes wrong with W&B (no network, a bad key, a full disk, `wandb.init` raising) is warned about
once and the run goes on with the CSV logger, which `make_loggers` always keeps beside W&B.
"""

import json
import logging
import math
import os
import struct
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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


# ---------------------------------------------------------------------------------------------- end of run
class WandbRunSummary(pl.Callback):
    """At the end of training, for every W&B logger: the run summary (best ``val/dice``, skipped steps, final
    loss scale, peak memory, mean step time, under ``summary/``), the loss-scale chart with overflow steps
    marked, ready as a custom panel, and a table of the per-layer abs-maxes. Does nothing without W&B."""

    def __init__(self) -> None:
        self.best_val_dice = -math.inf

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dice = trainer.callback_metrics.get("val/dice")
        if dice is not None and not trainer.sanity_checking:
            self.best_val_dice = max(self.best_val_dice, float(dice))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loggers = wandb_loggers(trainer)
        if not loggers:
            return
        from medseg.precision.monitor import PrecisionMonitor

        monitor = next((c for c in trainer.callbacks if isinstance(c, PrecisionMonitor)), None)
        summary: dict[str, Any] = {"summary/global_steps": trainer.global_step}
        if self.best_val_dice > -math.inf:
            summary["summary/best_val_dice"] = self.best_val_dice
        media: dict[str, Any] = {}
        if monitor is not None:
            summary.update({f"summary/{k}": v for k, v in monitor.totals().items()})
            if monitor.scale_history:
                media["precision/loss_scale_chart"] = loss_scale_chart(monitor.scale_history)
            if monitor.layer_absmax:
                media["precision/layer_absmax"] = layer_table(monitor.layer_absmax)
        for logger in loggers:
            if media:
                log_to_wandb(logger, media, trainer.global_step)
            if isinstance(logger, SafeWandbLogger):
                logger.update_summary(summary)
            else:
                logger.experiment.summary.update(summary)


def loss_scale_chart(history: list[tuple[int, float, int]]) -> Any:
    """A W&B line-series panel: the loss scale (a step function, only its changes stored) and, as a second
    series, a spike from 0 to the scale at every overflow step (a skipped step), flat 0 in between."""
    import wandb

    xs, ys = [], []
    for i, (step, scale, _) in enumerate(history):
        if i == 0 or i == len(history) - 1 or scale != history[i - 1][1]:
            if i > 0 and scale != history[i - 1][1]:
                xs.append(history[i - 1][0])
                ys.append(history[i - 1][1])
            xs.append(step)
            ys.append(scale)
    first, last = history[0][0], history[-1][0]
    spike_x, spike_y = [first], [0.0]
    for i, (step, scale, overflow) in enumerate(history):
        if overflow:
            before = history[i - 1][1] if i > 0 else scale
            spike_x += [step, step, step]
            spike_y += [0.0, before, 0.0]
    spike_x.append(last)
    spike_y.append(0.0)
    return wandb.plot.line_series(
        xs=[xs, spike_x],
        ys=[ys, spike_y],
        keys=["loss scale", "overflow (step skipped)"],
        title="Loss scale; spikes mark overflow steps",
        xname="trainer/global_step",
    )


def layer_table(layer_absmax: dict[str, tuple[float, float]]) -> Any:
    import wandb

    rows = []
    for name, (act, grad) in sorted(layer_absmax.items(), key=lambda kv: -kv[1][0]):
        headroom = math.log2(65504.0 / act) if act > 0 else math.inf
        rows.append([name, act, grad, headroom])
    return wandb.Table(columns=["layer", "act_absmax", "act_grad_absmax", "fp16_headroom_bits"], data=rows)


# ---------------------------------------------------------------------------------------------- offline files
# A `.wandb` file is a leveldb-style log (github.com/google/leveldb/blob/main/doc/log_format.md) of protobuf
# `wandb_internal_pb2.Record`s: a 7-byte file header (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of
# records, each with a 7-byte header (crc32, length, type FULL/FIRST/MIDDLE/LAST); a record longer than what
# is left in a block continues in the next, and a block tail under 7 bytes is zero padding. wandb 0.31 reads
# these in Go only (wandb-core), so this is the Python side.
_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def iter_records(path: str | Path) -> Iterator[Any]:
    """The ``wandb_internal_pb2.Record`` messages of a ``run-*.wandb`` file, in order; a torn tail (a run still
    writing, or killed) ends the iteration."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:_HEADER])
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path}: not a W&B transaction log (header {data[:_HEADER]!r})")
    pos, parts = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if len(chunk) < length:
            return
        if kind in (_FULL, _FIRST):
            parts = chunk
        elif kind in (_MIDDLE, _LAST):
            parts += chunk
        else:
            continue  # zero padding
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


def _item_key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class OfflineRun:
    """What a ``.wandb`` file holds, as plain Python: ``history`` rows (dicts keyed like ``run.log``), the
    final ``summary``, the ``config`` (nested dicts), the run's ``name``/``group``/``job_type``/``tags`` and the
    ``metrics`` definitions (name or glob -> step metric)."""

    path: Path
    name: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, str] = field(default_factory=dict)


def offline_run_file(run_dir: str | Path) -> Path | None:
    """The newest ``run-*.wandb`` under ``<run_dir>/wandb`` (offline or online runs both keep one)."""
    files = sorted(Path(run_dir).glob("wandb/*run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime)
    return files[-1] if files else None


def read_offline_run(path: str | Path) -> OfflineRun:
    """Read a ``run-*.wandb`` file, or the newest one of a run directory."""
    path = Path(path)
    if path.is_dir():
        found = offline_run_file(path)
        if found is None:
            raise FileNotFoundError(f"{path}: no wandb/*run-*/run-*.wandb file")
        path = found
    run = OfflineRun(path=path)

    def update(target: dict[str, Any], items: Any, nest: bool = True) -> None:
        for item in items:
            value = json.loads(item.value_json)
            if item.key or not nest:
                target[_item_key(item)] = value
                continue
            *parents, last = item.nested_key  # e.g. ("_wandb", "visualize", "<chart key>")
            node = target
            for key in parents:
                node = node.setdefault(key, {})
            node[last] = value

    for record in iter_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.name, run.group, run.job_type, run.tags = r.display_name, r.run_group, r.job_type, list(r.tags)
            update(run.config, r.config.update)
        elif kind == "config":
            update(run.config, record.config.update)
            for item in record.config.remove:
                run.config.pop(_item_key(item), None)
        elif kind == "history":
            row: dict[str, Any] = {}
            update(row, record.history.item, nest=False)  # flat, as logged: "val/examples/_type"
            run.history.append(row)
        elif kind == "summary":
            update(run.summary, record.summary.update, nest=False)
        elif kind == "metric":
            run.metrics[record.metric.name or record.metric.glob_name] = record.metric.step_metric
    return run
