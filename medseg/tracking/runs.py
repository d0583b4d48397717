"""Finished runs as data: a run's metrics and config from its CSV logger, its W&B offline file or the W&B API,
and the table a reviewer compares runs by. Reads files only; nothing here trains or logs."""

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from medseg.tracking.offline import read_offline_run
from medseg.tracking.tables import markdown_table

STEP_KEY = "trainer/global_step"  # W&B's x-axis; the CSV's is `step`, the same number


@dataclass
class RunLog:
    """One run's metrics as ``key -> (steps, values)`` float arrays, sorted by step, non-numbers dropped."""

    path: Path
    config: dict[str, Any]
    series: dict[str, tuple[np.ndarray, np.ndarray]]
    source: str  # "csv", "wandb-offline" or "wandb-api"
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def precision(self) -> str:
        """The `+precision=` option (fp32 when none), with the plugin's dtype where it has one."""
        prec = self.config.get("precision") or {}
        name = prec.get("name", "fp32")
        dtype = (prec.get("plugin") or {}).get("dtype")
        return f"{name} ({dtype})" if dtype and dtype != "auto" else name

    @property
    def label(self) -> str:
        return f"{self.name or self.path.name} [{self.precision}]"

    def get(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        return self.series.get(key, (np.empty(0), np.empty(0)))

    def has(self, key: str) -> bool:
        return len(self.get(key)[1]) > 0

    def last(self, key: str) -> float:
        values = self.get(key)[1]
        return float(values[-1]) if len(values) else math.nan

    def best(self, key: str) -> float:
        values = self.get(key)[1]
        return float(np.max(values)) if len(values) else math.nan


def _series(rows: list[dict[str, Any]], step_key: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    points: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        step = _number(row.get(step_key))
        if step is None:
            continue
        for key, value in row.items():
            number = _number(value)
            if number is not None and key not in (step_key, "_step", "_runtime", "_timestamp"):
                points.setdefault(key, []).append((step, number))
    out = {}
    for key, pts in points.items():
        pts.sort(key=lambda p: p[0])
        out[key] = (np.array([p[0] for p in pts]), np.array([p[1] for p in pts]))
    return out


def _number(value: Any) -> float | None:
    if value is None or value == "" or isinstance(value, (dict, list, bool)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def is_run_dir(path: Path) -> bool:
    return (path / "csv" / "metrics.csv").is_file() or any(path.glob("wandb/*run-*/run-*.wandb"))


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Each path if it is a run folder, else the run folders right below it (a multirun sweep's jobs)."""
    runs: list[Path] = []
    for p in map(Path, paths):
        if is_run_dir(p):
            runs.append(p)
            continue
        below = (
            sorted((c for c in p.iterdir() if c.is_dir() and is_run_dir(c)), key=lambda c: c.name) if p.is_dir() else []
        )
        if not below:
            raise FileNotFoundError(f"{p}: no csv/metrics.csv or wandb/*run-*/run-*.wandb here or one level down")
        runs.extend(below)
    return runs


def load_run(run_dir: str | Path) -> RunLog:
    """A run's metrics and resolved config from its CSV logger, else from its W&B transaction log."""
    run_dir = Path(run_dir)
    metrics = run_dir / "csv" / "metrics.csv"
    if metrics.is_file():
        with metrics.open() as f:
            rows = list(csv.DictReader(f))
        return RunLog(run_dir, _local_config(run_dir), _series(rows, "step"), "csv")
    offline = read_offline_run(run_dir)
    config = {k: v for k, v in offline.config.items() if not k.startswith("_")} or _local_config(run_dir)
    return RunLog(run_dir, config, _series(offline.history, STEP_KEY), "wandb-offline", extra={"wandb": offline})


def _local_config(run_dir: Path) -> dict[str, Any]:
    """The resolved config the CSV logger saved (`hparams.yaml`), else Hydra's own (unresolved) copy."""
    for path in (run_dir / "csv" / "hparams.yaml", run_dir / ".hydra" / "config.yaml"):
        if path.is_file():
            return yaml.safe_load(path.read_text()) or {}
    return {}


def load_wandb_api_run(run_path: str, samples: int = 100_000) -> RunLog:
    """A run from the W&B servers (``entity/project/run_id``; needs ``WANDB_API_KEY``), in the same form."""
    import wandb

    api_run = wandb.Api().run(run_path)
    rows = list(api_run.scan_history(page_size=min(samples, 10_000)))
    config = {k: v for k, v in api_run.config.items() if not k.startswith("_")}
    return RunLog(Path(run_path), config, _series(rows, STEP_KEY), "wandb-api", name=api_run.name)


def summary_rows(runs: list[RunLog]) -> list[dict[str, Any]]:
    """One dict per run: what a reviewer compares across precisions."""
    rows = []
    for run in runs:
        times = run.get("precision/step_time")[1]
        times = times[1:] if len(times) > 1 else times  # the first step includes warm-up
        throughput = run.get("precision/throughput")[1]
        lost = run.get("precision/update_lost_frac")[1]
        headroom = run.get("precision/fp16_headroom_bits")[1]
        rows.append(
            {
                "run": run.label,
                "steps": int(max((s.max() for s, _ in run.series.values() if len(s)), default=-1) + 1),
                "final train loss": run.last("train/loss"),
                "best val Dice": run.best("val/dice"),
                "skipped steps": run.last("precision/skipped_steps"),
                "NaN-loss steps": run.last("precision/nan_steps"),
                "final loss scale": run.last("precision/loss_scale"),
                "grad zero frac": run.last("precision/grad_zero_frac"),
                "updates lost (mean)": float(np.mean(lost)) if len(lost) else math.nan,
                "min FP16 headroom (bits)": float(np.min(headroom)) if len(headroom) else math.nan,
                "step time (ms)": float(np.median(times)) * 1000 if len(times) else math.nan,
                "throughput (Mvox/s)": float(np.median(throughput)) / 1e6 if len(throughput) else math.nan,
                "peak memory (MiB)": run.best("precision/peak_memory_mb"),
            }
        )
    return rows


def summary_table(runs: list[RunLog]) -> str:
    """The summary rows as a markdown table ("-": not logged for that precision)."""
    return markdown_table(summary_rows(runs)) if runs else "(no runs)"
