"""Review runs without W&B: `python -m medseg.report <run dir>... [--out DIR]`.

Writes PNG plots and `report.md` (a table per run, the plots linked) from each run's local files: the CSV
logger's `<run>/csv/metrics.csv` and `hparams.yaml`, or, when there is no CSV, the W&B transaction log
`<run>/wandb/*run-*/run-*.wandb`. No account or network needed. A multirun sweep folder stands for its jobs.

Plots: the loss scale with overflow (skipped) steps marked, train loss and validation Dice per run, the
`precision/` metrics of `medseg.precision.monitor`, and step time, throughput and peak memory per precision.
Runs are read by `medseg.tracking.runs` and drawn by `medseg.tracking.plots`, as in
`notebooks/review_runs.ipynb`.
"""

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from medseg.checkpoint import best_checkpoint
from medseg.precision.precision_plan import PLAN_FILE, load_plan
from medseg.tracking.plots import plot_loss_scale, plot_performance, plot_precision, plot_training
from medseg.tracking.runs import RunLog, find_runs, load_run, summary_table


def predict_val_case(run: RunLog, index: int = 0, device: str = "cpu") -> dict[str, Any]:
    """Predict validation case ``index`` of ``run`` with its best checkpoint; RAS arrays for ``plot_case``.

    Returns ``{"image", "label", "pred": (X, Y, Z) arrays, "label_names", "case"}``.
    """
    import nibabel as nib
    from hydra.utils import instantiate

    from medseg.inference.predictor import Predictor

    ckpt = best_checkpoint(run.path)
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


PLOTS = {
    "loss_scale.png": plot_loss_scale,
    "training.png": plot_training,
    "precision.png": plot_precision,
    "performance.png": plot_performance,
}


def plan_section(runs: list[RunLog]) -> str:
    """Each run's precision_plan.yaml: the modules kept in FP32 and the advisor's decisions ("" when none has one)."""
    lines = []
    for run in runs:
        path = run.path / PLAN_FILE
        if not path.is_file():
            continue
        plan = load_plan(path)
        lines.append(f"- `{run.label}`: FP32 modules {plan.fp32_modules or 'none'}")
        lines += [f"  - {d.line()}" for d in plan.decisions]
    return "\n## Precision plan\n\n" + "\n".join(lines) + "\n" if lines else ""


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
        f"{plan_section(runs)}"
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
    print(plan_section(runs), end="")
    print(f"\nwrote {path} and {len(PLOTS)} plots")
    return path


if __name__ == "__main__":
    main()
