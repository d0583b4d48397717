"""Review runs without W&B: `python -m medseg.report <run dir>... [--out DIR]`.

Writes PNG plots and `report.md` (a table per run, the plots linked) from each run's local files: the CSV
logger's `<run>/csv/metrics.csv` and `hparams.yaml`, or, when there is no CSV, the W&B transaction log
`<run>/wandb/*run-*/run-*.wandb`. No account or network needed. A multirun sweep folder stands for its jobs.

Plots: the loss scale with overflow (skipped) steps marked, train loss and validation Dice per run, the
`precision/` metrics of `medseg.precision.monitor`, and step time, throughput and peak memory per precision.
The functions return matplotlib Figures (no pyplot state), so `notebooks/review_runs.ipynb` shows the same.
"""

import argparse
import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib.figure import Figure

from medseg.tracking.display import axial_view
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


def best_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint with the highest Dice in its file name (`epoch...-dice0.1234.ckpt`), else last.ckpt."""
    folder = Path(run_dir) / "checkpoints"
    scored = [(float(m.group(1)), p) for p in folder.glob("*.ckpt") if (m := re.search(r"dice(\d+\.\d+)", p.name))]
    if scored:
        return max(scored)[1]
    last = folder / "last.ckpt"
    return last if last.is_file() else None


# -------------------------------------------------------------------------------------------------- the table
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


# -------------------------------------------------------------------------------------------------- the plots
def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")


def plot_loss_scale(runs: list[RunLog]) -> Figure:
    """The loss scale per run (log2 axis) with a red marker at every overflow, i.e. skipped, step."""
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.add_subplot()
    shown = False
    for i, run in enumerate(runs):
        steps, scale = run.get("precision/loss_scale")
        if not len(steps):
            continue
        shown = True
        ax.step(steps, scale, where="post", label=run.label, color=f"C{i}")
        o_steps, overflow = run.get("precision/overflow")
        hits = o_steps[overflow > 0]
        if len(hits):
            ax.plot(hits, np.interp(hits, steps, scale), "v", color="red", ms=8, zorder=3)
    if shown:
        ax.set_yscale("log", base=2)
        ax.plot([], [], "v", color="red", label="overflow (step skipped)")
        ax.legend(fontsize=8)
    else:
        _empty(ax, "no loss scale logged (fp32, bf16 and *-true runs have none)")
    ax.set(title="Loss scale", xlabel="step", ylabel="loss scale")
    return fig


def plot_training(runs: list[RunLog]) -> Figure:
    """Train loss and validation Dice against the step, one line per run."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    loss_ax, dice_ax = fig.subplots(1, 2)
    for i, run in enumerate(runs):  # one colour per run in every plot
        loss_ax.plot(*run.get("train/loss"), label=run.label, lw=1, color=f"C{i}")
        dice_ax.plot(*run.get("val/dice"), "o-", label=run.label, color=f"C{i}")
    loss_ax.set(title="train/loss", xlabel="step")
    dice_ax.set(title="val/dice", xlabel="step", ylim=(0, 1))
    for ax, key in ((loss_ax, "train/loss"), (dice_ax, "val/dice")):
        if any(r.has(key) for r in runs):
            ax.legend(fontsize=8)
        else:
            _empty(ax, f"no {key} logged")
    return fig


PRECISION_PANELS = [
    ("precision/grad_norm", "gradient norm (unscaled FP32)", "log"),
    ("precision/fp16_headroom_bits", "FP16 headroom of the scaled grads (bits)", "linear"),
    ("precision/grad_zero_frac", "low-precision grads zero or subnormal", "linear"),
    ("precision/update_lost_frac", "updates lost without FP32 masters", "linear"),
    ("precision/act_absmax", "largest activation abs-max", "log"),
    ("precision/skipped_steps", "skipped steps (cumulative)", "linear"),
]


def plot_precision(runs: list[RunLog]) -> Figure:
    """The ``precision/`` metrics, one panel each; a panel says so when no run logged its metric."""
    fig = Figure(figsize=(13, 7), layout="constrained")
    for ax, (key, title, scale) in zip(fig.subplots(2, 3).flat, PRECISION_PANELS, strict=True):
        drawn = False
        for i, run in enumerate(runs):
            steps, values = run.get(key)
            if len(steps):
                ax.plot(steps, values, ".-" if len(steps) < 50 else "-", label=run.label, lw=1, color=f"C{i}")
                drawn = True
        if drawn:
            if scale == "log" and all((run.get(key)[1] > 0).all() for run in runs if run.has(key)):
                ax.set_yscale("log")
            ax.legend(fontsize=7)
        else:
            _empty(ax, "not logged for these precisions")
        ax.set(title=title, xlabel="step")
    return fig


def plot_performance(runs: list[RunLog]) -> Figure:
    """Median step time, throughput and peak memory per run (labelled with its precision)."""
    rows = summary_rows(runs)
    fig = Figure(figsize=(12, 3.8), layout="constrained")
    labels = [r["run"] for r in rows]
    for ax, key in zip(fig.subplots(1, 3), ("step time (ms)", "throughput (Mvox/s)", "peak memory (MiB)"), strict=True):
        values = [0.0 if math.isnan(r[key]) else r[key] for r in rows]
        bars = ax.barh(range(len(rows)), values, color=[f"C{i}" for i in range(len(rows))])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set(title=key)
    return fig


def plot_case(
    image: np.ndarray, label: np.ndarray, pred: np.ndarray, label_names: list[str], title: str = ""
) -> Figure:
    """The middle axial slice of an (X, Y, Z) RAS volume: the image, the ground truth and the prediction."""
    z = image.shape[2] // 2
    fig = Figure(figsize=(12, 4.3), layout="constrained")
    colors = ["none", "tab:green", "tab:red", "tab:blue", "tab:orange", "tab:purple", "tab:cyan"]
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    cmap = ListedColormap(colors[: max(len(label_names), 2)])
    shown = axial_view(image, z)
    for ax, mask, name in zip(
        fig.subplots(1, 3), (None, label, pred), ("image", "ground truth", "prediction"), strict=True
    ):
        ax.imshow(shown, cmap="gray")
        if mask is not None:
            ax.imshow(axial_view(mask, z), cmap=cmap, vmin=0, vmax=cmap.N - 1, alpha=0.45, interpolation="nearest")
        ax.set(title=name, xticks=[], yticks=[])
    handles = [Patch(color=cmap(i), label=n) for i, n in enumerate(label_names) if i > 0 and i < cmap.N]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles) or 1)
    fig.suptitle(f"{title} (axial slice z={z})")
    return fig


def predict_val_case(run: RunLog, index: int = 0, device: str = "cpu") -> dict[str, Any]:
    """Predict validation case ``index`` of ``run`` with its best checkpoint; RAS arrays for ``plot_case``.

    Returns ``{"image", "label", "pred": (X, Y, Z) arrays, "label_names", "case"}``.
    """
    import nibabel as nib
    from hydra.utils import instantiate

    from medseg.predict import Predictor

    ckpt = best_checkpoint(run.path)
    if ckpt is None:
        raise FileNotFoundError(f"{run.path}: no checkpoint to predict with")
    data_cfg = {**run.config["data"], "validate": False, "synthesize": None}
    datamodule = instantiate(data_cfg)
    _, val = datamodule.split()
    item = val[index]
    mask = Predictor(str(ckpt), device=device)(Path(item["image"]))
    source = nib.load(item["image"])

    def ras(img: Any) -> np.ndarray:
        data = np.asarray(nib.as_closest_canonical(img).dataobj)
        return data[..., 0] if data.ndim == 4 else data

    return {
        "image": ras(source).astype(np.float32),
        "label": ras(nib.load(item["label"])).astype(np.uint8),
        "pred": ras(nib.Nifti1Image(mask, source.affine)).astype(np.uint8),
        "label_names": datamodule.label_names,
        "case": Path(item["image"]).name,
    }


# -------------------------------------------------------------------------------------------------- report.md
PLOTS = {
    "loss_scale.png": plot_loss_scale,
    "training.png": plot_training,
    "precision.png": plot_precision,
    "performance.png": plot_performance,
}


def write_report(runs: list[RunLog], out: str | Path) -> Path:
    """The PNGs and ``report.md`` in ``out``; returns the markdown file."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, plot in PLOTS.items():
        plot(runs).savefig(out / name, dpi=110)
    sources = "\n".join(f"- `{r.label}`: {r.path} ({r.source})" for r in runs)
    text = (
        "# medseg run report\n\n"
        f"{sources}\n\n{summary_table(runs)}\n\n"
        "`-`: not logged for that precision (no loss scale in fp32/bf16, no low-precision metrics in fp32).\n\n"
        "## Loss scale\n\n![loss scale](loss_scale.png)\n\n"
        "## Training\n\n![training](training.png)\n\n"
        "## Precision metrics\n\n![precision](precision.png)\n\n"
        "## Speed and memory\n\n![performance](performance.png)\n"
    )
    path = out / "report.md"
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m medseg.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (or a multirun folder: its jobs)")
    parser.add_argument("--out", help="output folder (default: <run>/report for one run, ./report for several)")
    args = parser.parse_args(argv)
    runs = [load_run(p) for p in find_runs(args.runs)]
    out = Path(args.out) if args.out else (runs[0].path / "report" if len(runs) == 1 else Path("report"))
    path = write_report(runs, out)
    print(summary_table(runs))
    print(f"\nwrote {path} and {len(PLOTS)} plots")
    return path


if __name__ == "__main__":
    main()
