"""The end of a run: its best score, and for W&B the run summary, the loss-scale chart and the per-layer table."""

from typing import Any

import lightning.pytorch as pl

from medseg.precision.dtypes import headroom_bits
from medseg.precision.monitor import PrecisionMonitor
from medseg.precision.precision_plan import PrecisionPlan
from medseg.precision.view import master_weights
from medseg.tracking.loggers import SafeWandbLogger, log_to_wandb, wandb_loggers


def best_score(trainer: pl.Trainer, key: str) -> float | None:
    """The checkpoint callback's best score when it monitors ``key``, else the last ``key`` logged (None if never)."""
    ckpt = trainer.checkpoint_callback
    if ckpt is not None and ckpt.monitor == key and ckpt.best_model_score is not None:
        return float(ckpt.best_model_score)
    value = trainer.callback_metrics.get(key)
    return float(value) if value is not None else None


class WandbRunSummary(pl.Callback):
    """At the end of training, for every W&B logger: the run summary (best ``val/dice``, skipped steps, final
    loss scale, peak memory, mean step time, under ``summary/``), the loss-scale chart with overflow steps
    marked, ready as a custom panel, and a table of the per-layer abs-maxes. Does nothing without W&B."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loggers = wandb_loggers(trainer)
        if not loggers:
            return
        monitor = PrecisionMonitor.of(trainer)
        summary: dict[str, Any] = {"summary/global_steps": trainer.global_step}
        best_dice = best_score(trainer, "val/dice")
        if best_dice is not None:
            summary["summary/best_val_dice"] = best_dice
        media: dict[str, Any] = {}
        plugin = master_weights(trainer)
        plan = plugin.precision_plan if plugin is not None else None
        if plan is not None:  # logged even when empty, so the dashboard's plan panel always has its table
            media["precision/plan"] = plan_table(plan)
        if plugin is not None and plan is not None and plugin.advisor is not None and plugin.advisor.lost_updates:
            rows = sorted(plugin.advisor.lost_updates.items(), key=lambda kv: -kv[1])
            media["precision/lost_updates"] = _table(["module", "lost_update_share"], [list(r) for r in rows])
            summary["summary/fp32_modules"] = len(plan.fp32_modules)
        if monitor is not None:
            summary.update({f"summary/{k}": v for k, v in monitor.totals().items()})
            if monitor.scale_history:
                promotions = [d.step for d in plan.decisions] if plan is not None else []
                media["precision/loss_scale_chart"] = loss_scale_chart(monitor.scale_history, promotions)
            if monitor.layer_absmax:
                media["precision/layer_absmax"] = layer_table(monitor.layer_absmax)
        for logger in loggers:
            if media:
                log_to_wandb(logger, media, trainer.global_step)
            if isinstance(logger, SafeWandbLogger):
                logger.update_summary(summary)
            else:
                logger.experiment.summary.update(summary)


def loss_scale_chart(history: list[tuple[int, float, int]], promotions: list[int] | None = None) -> Any:
    """A W&B line-series panel: the loss scale (a step function, only its changes stored) and, as a second
    series, a spike from 0 to the scale at every overflow step (a skipped step), flat 0 in between; with
    ``promotions`` (the advisor's decision steps) a third series spikes to twice the scale where a module was
    promoted to FP32."""
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
    series_x, series_y, keys = [xs, spike_x], [ys, spike_y], ["loss scale", "overflow (step skipped)"]
    if promotions:
        scale_at = dict((step, scale) for step, scale, _ in history)
        px, py = [first], [0.0]
        for step in promotions:
            px += [step, step, step]
            py += [0.0, 2 * scale_at.get(step, max(ys)), 0.0]
        series_x.append(px + [last])
        series_y.append(py + [0.0])
        keys.append("module promoted to FP32")
    return wandb.plot.line_series(
        xs=series_x,
        ys=series_y,
        keys=keys,
        title="Loss scale; spikes mark overflow steps",
        xname="trainer/global_step",
    )


def layer_table(layer_absmax: dict[str, tuple[float, float]]) -> Any:
    import wandb

    rows = []
    for name, (act, grad) in sorted(layer_absmax.items(), key=lambda kv: -kv[1][0]):
        rows.append([name, act, grad, headroom_bits(act)])
    return wandb.Table(columns=["layer", "act_absmax", "act_grad_absmax", "fp16_headroom_bits"], data=rows)


def plan_table(plan: PrecisionPlan) -> Any:
    """The precision plan as a W&B table: every FP32 module pattern, with the advisor's decision where it made one."""
    import wandb

    decided = {d.layer: d for d in plan.decisions}
    rows = []
    for name in plan.fp32_modules:
        d = decided.get(name)
        rows.append([name, "advisor" if d else "config/plan file", *(
            [d.step, d.where, d.overflows, d.window, d.scale, d.headroom_bits] if d else [None] * 6
        )])  # fmt: skip
    # `where`: the first non-finite value (overflow rule), or the values short of headroom (headroom rule)
    columns = ["module", "source", "step", "where", "overflows", "window", "loss scale", "headroom bits"]
    return wandb.Table(columns=columns, data=rows)


def _table(columns: list[str], rows: list[list[Any]]) -> Any:
    import wandb

    return wandb.Table(columns=columns, data=rows)
