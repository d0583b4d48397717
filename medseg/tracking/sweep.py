"""Sweep bookkeeping: every job writes `job_result.json` into its output directory; at the end of a multirun,
`SweepSummary` (a Hydra callback, registered in conf/hydra/default.yaml) gathers them into one table, printed and
written as `summary.csv` and `summary.md` in the sweep directory.

Files rather than in-memory job returns, so the summary is the same whatever the launcher: with submitit the
jobs run on other machines and only their output directories come back.
"""

import csv
import io
import json
import logging
import math
import traceback
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from medseg.precision.monitor import PrecisionMonitor
from medseg.precision.view import master_weights
from medseg.reliability.atomic_io import write_atomic
from medseg.tracking.summary import best_score
from medseg.tracking.tables import fmt, markdown_table

log = logging.getLogger(__name__)

RESULT_FILE = "job_result.json"
COLUMNS = ["job", "overrides", "status", "best_val_dice", "skipped_steps", "step_time_s", "peak_memory_mb", "error"]


@rank_zero_only
def write_job_result(
    cfg: DictConfig,
    trainer: pl.Trainer | None = None,
    optimized: float | None = None,
    error: BaseException | None = None,
) -> Path:
    """Write `<cfg.paths.output_dir>/job_result.json`: status ("ok" or "failed"), error, `cfg.optimized_metric`
    and its value, best val Dice, and PrecisionMonitor's totals: skipped steps, mean step time, peak memory (CUDA
    peak, or the process' peak RSS on CPU). Without the monitor: skipped steps from medseg's plugin and the CUDA
    peak. `trainer` is None when the job failed before or while building it."""
    result: dict[str, Any] = {"status": "ok", "error": "", "optimized_metric": cfg.get("optimized_metric")}
    result["optimized_value"] = optimized
    if error is not None:
        result.update(status="failed", error=f"{type(error).__name__}: {error}")
        result["traceback"] = "".join(traceback.format_exception(error))
    elif optimized is not None and math.isnan(optimized):
        result.update(status="failed", error=f"{cfg.optimized_metric} is NaN")
    if trainer is not None:
        result["best_val_dice"] = best_score(trainer, "val/dice")
        result["global_step"] = trainer.global_step
        monitor = PrecisionMonitor.of(trainer)
        totals = monitor.totals() if monitor is not None else {}
        plugin = master_weights(trainer)
        plugin_step = plugin.last_step if plugin is not None else {}
        result["skipped_steps"] = totals.get("skipped_steps", plugin_step.get("skipped_steps"))
        result["step_time_s"] = totals.get("mean_step_time_s")
        result["peak_memory_mb"] = totals.get("peak_memory_mb")
    if result.get("peak_memory_mb") is None and torch.cuda.is_initialized():
        # SweepSummary.on_job_start resets the peak, so in a multirun this is this job's own
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    path = Path(cfg.paths.output_dir, RESULT_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=float) + "\n")
    return path


def _job_dirs(sweep_dir: Path) -> list[Path]:
    """Output directories of the jobs under a sweep directory (the ones Hydra saved a `.hydra/` into), in job order."""
    dirs = [p.parent.parent for p in sweep_dir.glob("**/.hydra/overrides.yaml")]

    def job_num(d: Path) -> tuple[int, str]:
        hydra_yaml = OmegaConf.load(d / ".hydra" / "hydra.yaml")
        return int(OmegaConf.select(hydra_yaml, "hydra.job.num", default=-1)), str(d)

    return sorted(dirs, key=job_num)


def collect_results(sweep_dir: Path, failures: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One row per job (COLUMNS plus output_dir). Overrides shown are the ones that differ between jobs (the
    swept ones), all of them when there is a single job. `failures`: output dir -> error, for jobs that raised
    before they could write their result."""
    jobs = [(d, list(OmegaConf.load(d / ".hydra" / "overrides.yaml"))) for d in _job_dirs(sweep_dir)]
    common = set.intersection(*(set(o) for _, o in jobs)) if len(jobs) > 1 else set()
    rows = []
    for job_dir, overrides in jobs:
        row: dict[str, Any] = dict.fromkeys(COLUMNS, "")
        result_file = job_dir / RESULT_FILE
        if result_file.is_file():
            row.update({k: v for k, v in json.loads(result_file.read_text()).items() if k in COLUMNS and v is not None})
        else:
            error = (failures or {}).get(str(job_dir.resolve()), f"no {RESULT_FILE}: crashed, killed or still running")
            row.update(status="failed", error=error)
        row.update(
            job=str(job_dir.relative_to(sweep_dir)),
            overrides=" ".join(o for o in overrides if o not in common),
            output_dir=str(job_dir),
        )
        rows.append(row)
    return rows


def _write_text(path: Path, text: str) -> None:
    # jobs on a cluster finish at the same time: readers see the old table or the new one, never half of one
    write_atomic(path, lambda tmp: tmp.write_text(text))


def write_summary(rows: list[dict[str, Any]], sweep_dir: Path) -> None:
    """`summary.csv` (COLUMNS and output_dir) and `summary.md` (COLUMNS) in the sweep directory."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=[*COLUMNS, "output_dir"])
    writer.writeheader()
    writer.writerows(rows)
    _write_text(sweep_dir / "summary.csv", out.getvalue())
    _write_text(sweep_dir / "summary.md", markdown_table(rows, COLUMNS) + "\n")


def print_summary(rows: list[dict[str, Any]], sweep_dir: Path) -> None:
    table = Table(title=f"Sweep summary ({len(rows)} jobs)")
    for column in COLUMNS:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(fmt(row[c]) for c in COLUMNS), style="red" if row["status"] != "ok" else None)
    console = Console()
    if not console.is_terminal:  # a log file or a pipe: no width to fit, keep each job on one line
        console = Console(width=240)
    console.print(table)
    print(f"sweep summary: {sweep_dir / 'summary.csv'}")


class SweepSummary(Callback):
    """Hydra callback: the sweep summary, rewritten after each job (an interrupted sweep still has its table) and
    printed at the end of the multirun. Also makes the Optuna SQLite storage's folder (SQLite does not create it)
    and resets the CUDA memory peak before each job."""

    def __init__(self) -> None:
        self.failures: dict[str, str] = {}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        storage = OmegaConf.select(config, "hydra.sweeper.storage", default=None)
        if isinstance(storage, str) and storage.startswith("sqlite:///"):
            Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        local = str(config.hydra.launcher._target_).endswith("BasicLauncher")
        if local and "ddp" in str(OmegaConf.select(config, "trainer.strategy")) and config.trainer.devices != 1:
            # Lightning starts ranks > 0 by re-running sys.argv, which here is the whole sweep command
            log.warning("trainer=ddp in a local multirun is not supported: sweep DDP jobs with hydra/launcher=slurm")

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        # Only jobs that raised out of the task function (train.main catches errors in multirun mode);
        # `return_value` would re-raise the error, `_return_value` holds it.
        if job_return.status == JobStatus.FAILED:
            error = job_return._return_value
            self.failures[str(Path(config.hydra.runtime.output_dir).resolve())] = f"{type(error).__name__}: {error}"
        if config.hydra.mode == RunMode.MULTIRUN:
            sweep_dir = Path(config.hydra.sweep.dir)
            write_summary(collect_results(sweep_dir, self.failures), sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect_results(sweep_dir, self.failures)
        if not rows:
            log.warning(f"sweep summary: no job directories under {sweep_dir}")
            return
        write_summary(rows, sweep_dir)
        print_summary(rows, sweep_dir)
