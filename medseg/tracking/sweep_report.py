"""A W&B report per sweep (`python -m medseg.dashboard --report <sweep dir or group>`): the precision modes of one
sweep side by side (best Dice, skipped steps, step time, peak memory), their curves, and the sweep's table as it
was written when the sweep ended (`summary.md`). Every panel names keys medseg logs (a test runs a real sweep)."""

from pathlib import Path

from omegaconf import OmegaConf

from medseg.tracking.dashboard import RUN_COLUMNS, panel_keys
from medseg.tracking.offline import read_offline_run
from medseg.tracking.runs import STEP_KEY

# Bars: one per precision mode (runs grouped by `precision.name`, the `+precision=` option); every mode logs them.
COMPARED = dict(zip(RUN_COLUMNS, ["Best val Dice", "Skipped steps", "Mean step time (s)", "Peak memory (MiB)"],
                    strict=True))  # fmt: skip
# Curves, one line per run; the loss scale only exists for the modes that scale the loss (amp, mixed).
CURVES = {
    "val/dice": "Validation Dice",
    "train/loss": "Training loss",
    "precision/loss_scale": "Loss scale (scaled modes)",
    "precision/step_time": "Step time (s)",
}


def sweep_group(sweep_dir: str | Path) -> str:
    """The W&B group of a sweep directory's jobs: the one their runs were logged in, else the name medseg gives
    (`<task_name>-<sweep dir name>`, `medseg.tracking.loggers.run_identity`)."""
    sweep_dir = Path(sweep_dir)
    for job in sorted(sweep_dir.glob("*/wandb/*run-*"), key=lambda p: str(p)):
        group = read_offline_run(job.parent.parent).group
        if group:
            return group
    configs = sorted(sweep_dir.glob("*/.hydra/config.yaml"))
    task = OmegaConf.load(configs[0]).get("task_name", "train") if configs else "train"
    return f"{task}-{sweep_dir.name}"


def _grid(i: int, w: int = 8, h: int = 6):
    import wandb_workspaces.reports.v2 as wr

    return wr.Layout(x=(i * w) % 24, y=(i * w) // 24 * h, w=w, h=h)


def panels() -> list:
    import wandb_workspaces.reports.v2 as wr

    by_mode = wr.Config("precision.name")
    out = [
        wr.BarPlot(title=title, metrics=[key], groupby=by_mode, groupby_aggfunc="mean", layout=_grid(i))
        for i, (key, title) in enumerate(COMPARED.items())
    ]
    out += [
        wr.LinePlot(
            title=title, x=STEP_KEY, y=[key], log_y=key == "precision/loss_scale" or None, layout=_grid(len(out) + i)
        )  # fmt: skip
        for i, (key, title) in enumerate(CURVES.items())
    ]
    out.append(wr.RunComparer(diff_only="split", layout=wr.Layout(x=0, y=100, w=24, h=10)))
    return out


def sweep_report(entity: str, project: str, group: str, table_markdown: str | None = None):
    """The report (`wandb_workspaces.reports.v2.Report`) comparing the runs of W&B group `group`."""
    import wandb_workspaces.reports.v2 as wr

    runs = wr.Runset(entity=entity, project=project, name=group, filters=f"Group = '{group}'")
    blocks = [
        wr.P(
            f"The jobs of sweep {group}, one run per setting (same seed, data and steps): accuracy, skipped "
            "steps, speed and memory per precision mode, grouped by the `+precision=` option."
        ),  # fmt: skip
        wr.PanelGrid(runsets=[runs], panels=panels()),
    ]
    if table_markdown:
        blocks += [wr.H2("The sweep table (summary.md)"), wr.MarkdownBlock(text=table_markdown)]
    return wr.Report(entity=entity, project=project, title=f"Precision comparison: {group}", blocks=blocks,
                     width="fluid")  # fmt: skip


def report_keys(report) -> list[str]:
    """Every key the report's panels show, in order."""
    import wandb_workspaces.reports.v2 as wr

    keys = []
    for block in report.blocks:
        if isinstance(block, wr.PanelGrid):
            for panel in block.panels:
                keys += panel_keys(panel)
    return list(dict.fromkeys(keys))
