"""The W&B workspace of a medseg project, in code (W&B's `wandb-workspaces`): four sections that answer the
questions a run is reviewed for, instead of W&B's default of one chart per key in alphabetical order.

- Accuracy: validation Dice (mean and per class), training loss, test Dice and HD95 per class, the per-case table
  and the validation slices.
- Precision: the loss scale with its overflow markers, skipped and NaN steps, the unscaled gradient norm, the
  underflow share, lost updates, FP16 headroom, the precision plan and per-layer tables.
- Speed and memory: step time, throughput, peak memory.
- Sweeps: runs grouped by their sweep group, parallel coordinates of the swept keys against the best val/dice, the
  sweep's modes side by side, and the run comparer (the sweep table).

Every panel names keys that medseg logs (`panel_keys`; a test checks them against a real offline run), so no panel
is empty after `wandb sync`. Building needs no server; only `Workspace.save()` talks to one (`views.py`).
"""

from collections.abc import Sequence

from medseg.tracking.runs import STEP_KEY

WORKSPACE_NAME = "medseg"
# What the sweep presets (conf/sweep/*.yaml) vary, read from each run's config.
SWEPT_CONFIG_KEYS = (
    "precision.name",
    "model.optimizer.lr",
    "data.batch_size",
    "precision.plugin.scaler.growth_interval",
)
BEST_DICE = "summary/best_val_dice"  # WandbRunSummary's best val/dice (the summary's `val/dice` is a max/last pair)
RUN_COLUMNS = (BEST_DICE, "summary/skipped_steps", "summary/mean_step_time_s", "summary/peak_memory_mb")
# W&B's line-series chart (`wandb.plot.line_series`), as WandbRunSummary logs the loss scale with overflow spikes
LOSS_SCALE_TABLE = "precision/loss_scale_chart_table"
LINE_SERIES_CHART = "wandb/lineseries/v0"


def _line(title: str, *keys: str, log_y: bool | None = None, **kwargs):
    import wandb_workspaces.reports.v2 as wr

    return wr.LinePlot(title=title, x=STEP_KEY, y=list(keys), log_y=log_y, **kwargs)


def _bars(title: str, *keys: str, **kwargs):
    import wandb_workspaces.reports.v2 as wr

    return wr.BarPlot(title=title, metrics=list(keys), **kwargs)


def _table(key: str):
    import wandb_workspaces.reports.v2 as wr

    return wr.WeavePanelSummaryTable(table_name=key, layout=wr.Layout(w=24, h=10))


def loss_scale_chart():
    """The loss scale (log scale) with a spike at every overflow step: `WandbRunSummary`'s line-series table."""
    import wandb_workspaces.reports.v2 as wr

    return wr.CustomChart(
        query={"summaryTable": {"tableKey": LOSS_SCALE_TABLE}},
        chart_name=LINE_SERIES_CHART,
        chart_fields={"step": "step", "lineKey": "lineKey", "lineVal": "lineVal"},
        chart_strings={"title": "Loss scale; spikes mark overflow steps", "xname": STEP_KEY},
        layout=wr.Layout(w=16, h=8),
    )


def accuracy_panels(label_names: Sequence[str]) -> list:
    import wandb_workspaces.reports.v2 as wr

    classes = list(label_names)[1:]  # index 0 is the background, never scored
    return [
        _line("Validation Dice (mean over classes)", "val/dice"),
        _line("Validation Dice per class", *(f"val/dice/{c}" for c in classes)),
        _line("Training loss", "train/loss"),
        _bars("Test Dice per class (best checkpoint)", "test/dice", *(f"test/dice/{c}" for c in classes)),
        _bars("Test HD95 per class (mm)", "test/hd95", *(f"test/hd95/{c}" for c in classes)),
        _table("test/cases"),
        wr.MediaBrowser(title="Validation slices: label and prediction", media_keys=["val/examples"]),
    ]


def precision_panels() -> list:
    return [
        loss_scale_chart(),
        _line("Loss scale", "precision/loss_scale", log_y=True),
        _line("Skipped and NaN steps (cumulative)", "precision/skipped_steps", "precision/nan_steps"),
        _line("Unscaled FP32 gradient norm", "precision/grad_norm", log_y=True),
        _line("Underflow share: zero or subnormal low-precision gradients", "precision/grad_zero_frac"),
        _line("Lost updates: master updates a low-precision weight would not show", "precision/update_lost_frac"),
        _line("FP16 headroom (bits below 65504)", "precision/fp16_headroom_bits"),
        _line(
            "Largest activation and output-gradient abs-max",
            "precision/act_absmax",
            "precision/act_grad_absmax",
            log_y=True,
        ),  # fmt: skip
        _table("precision/plan"),
        _table("precision/layer_absmax"),
    ]


def speed_panels() -> list:
    return [
        _line("Step time (s)", "precision/step_time"),
        _line("Throughput (voxels/s)", "precision/throughput"),
        _line("Peak memory (MiB)", "precision/peak_memory_mb"),
    ]


def sweep_panels() -> list:
    import wandb_workspaces.reports.v2 as wr

    by_mode = wr.Config("precision.name")
    columns = [wr.ParallelCoordinatesPlotColumn(metric=wr.Config(k)) for k in SWEPT_CONFIG_KEYS]
    columns.append(wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(BEST_DICE), display_name="best val Dice"))
    return [
        _line(
            "Validation Dice by sweep group",
            "val/dice",
            groupby="Group",
            groupby_aggfunc="mean",
            groupby_rangefunc="minmax",
        ),  # fmt: skip
        wr.ParallelCoordinatesPlot(
            title="Swept settings against the best val Dice", columns=columns, layout=wr.Layout(w=24, h=8)
        ),  # fmt: skip
        _bars("Best val Dice per precision mode", BEST_DICE, groupby=by_mode, groupby_aggfunc="mean"),
        _bars("Skipped steps per precision mode", "summary/skipped_steps", groupby=by_mode, groupby_aggfunc="mean"),
        _bars(
            "Mean step time (s) per precision mode", "summary/mean_step_time_s", groupby=by_mode, groupby_aggfunc="mean"
        ),  # fmt: skip
        _bars(
            "Peak memory (MiB) per precision mode", "summary/peak_memory_mb", groupby=by_mode, groupby_aggfunc="mean"
        ),  # fmt: skip
        wr.RunComparer(diff_only="split", layout=wr.Layout(w=24, h=10)),
    ]


def workspace(entity: str, project: str, label_names: Sequence[str], name: str = WORKSPACE_NAME):
    """The project's workspace (`wandb_workspaces.workspaces.Workspace`); `label_names` (index 0 background) give
    the per-class panels. Raises ImportError without the `dashboard` extra (`pip install medseg[dashboard]`)."""
    import wandb_workspaces.workspaces as ws

    sections = [
        ws.Section(name="Accuracy", panels=accuracy_panels(label_names), is_open=True),
        ws.Section(name="Precision", panels=precision_panels(), is_open=True),
        ws.Section(name="Speed and memory", panels=speed_panels(), is_open=True),
        ws.Section(name="Sweeps", panels=sweep_panels()),
    ]
    return ws.Workspace(
        entity=entity,
        project=project,
        name=name,
        sections=sections,
        settings=ws.WorkspaceSettings(x_axis=STEP_KEY),
        # the runs table as the sweep table (summary.csv's columns): name, group, precision, then RUN_COLUMNS
        runset_settings=ws.RunsetSettings(
            pinned_columns=[
                "run:displayName",
                "run:group",
                "config:precision.name.value",
                *(f"summary:{k}" for k in RUN_COLUMNS),
            ]
        ),
    )


def panel_keys(panel) -> list[str]:
    """The run keys a panel shows: history/summary keys as logged, config keys as `config:<dotted path>`.
    Empty for a panel that shows whole runs (RunComparer)."""
    import wandb_workspaces.reports.v2 as wr

    def key(metric) -> str:
        if isinstance(metric, wr.Config):
            return f"config:{metric.name}"
        return metric if isinstance(metric, str) else metric.name

    if isinstance(panel, wr.LinePlot):
        return [key(m) for m in panel.y]
    if isinstance(panel, wr.BarPlot):
        return [key(m) for m in panel.metrics]
    if isinstance(panel, wr.ParallelCoordinatesPlot):
        return [key(c.metric) for c in panel.columns]
    if isinstance(panel, wr.MediaBrowser):
        return list(panel.media_keys)
    if isinstance(panel, wr.WeavePanelSummaryTable):
        return [panel.table_name]
    if isinstance(panel, wr.CustomChart):
        return [panel.query["summaryTable"]["tableKey"]]
    return []
