"""The review plots as matplotlib Figures (no pyplot state), shared by `medseg.report` and the notebook."""

import math
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from medseg.tracking.display import axial_view
from medseg.tracking.runs import RunLog, summary_rows


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
