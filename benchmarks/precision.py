"""Precision benchmark: the same 3D U-Net, data and seed trained by the real Lightning Trainer in each precision.

    python benchmarks/precision.py                                   # CPU: every mode, patch 64/96/128, UNet
    python benchmarks/precision.py --device cuda --patch 128 --batch 2 --modes fp32 amp mixed mixed:cl

Each (model, patch, mode) is one `trainer.fit`; on CPU in a fresh subprocess, so peak memory is that run's own
(the process's peak RSS, `ru_maxrss`, minus its RSS before `fit`); on CUDA in this process by default (`--isolate`),
peak memory being `max_memory_allocated` above what was allocated before `fit`. Reported per run:
median step time after warm-up, throughput (patch voxels/s), peak memory, the time the precision plugin's
`optimizer_step` spends outside the forward/backward closure (grad copy, unscale/inf check, clipping, optimizer
step, copy back) and its share of the step, and the loss at the last step. Ratios are against `fp32` and `amp`
of the same invocation. On a CPU shared with other work: `--max-wait 240` waits for idle CPUs before each run,
`--repeat 2` interleaves repeated runs (their steps are pooled) and `--stat min` reports the least disturbed step.

Modes, each with optional suffixes: `:cl` channels-last 3D, `:compile` torch.compile of the net, `:fused` the
optimizer with `fused=True`, `:normfp32` (mixed only) BatchNorm/InstanceNorm fed FP32 copies of their input
(`norms_in_float32=True`, the plugin's behaviour before 2026-11-26 20:10 UTC, called `mixed` in older tables;
the `:normlow` of those tables is today's default `mixed`):
    fp32   Trainer(precision="32-true"); on CUDA cuDNN's TF32 is on (PyTorch's default for convolutions)
    amp    "16-mixed": autocast + GradScaler; on CPU Lightning turns it into "bf16-mixed" (see the precision column)
    bf16   "bf16-mixed"
    half   "16-true" on CUDA, "bf16-true" on CPU: low-precision weights, no FP32 masters, no loss scaling
    mixed  medseg.precision.plugin.MasterWeightPrecision(dtype="auto"): FP16 (CUDA) / BF16 (CPU) weights, FP32 masters

The data are a few fixed synthetic batches (spheres of classes 1 and 2 in noise, seed 0) kept on the device, so
the loader never limits a step; benchmarks/data.py measures the loaders. `StepTimer` is also a Lightning
callback for real runs: `python -m medseg.train ++callbacks.step_timer._target_=benchmarks.precision.StepTimer`.
"""

import argparse
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import Dataset

from medseg.tracking.tables import markdown_table

REPO_ROOT = Path(__file__).resolve().parents[1]
MODES = ("fp32", "amp", "bf16", "half", "mixed")
OPTIONS = ("cl", "compile", "fused", "normfp32")  # per-mode suffixes: `mixed:cl`, `amp:fused`, `mixed:normfp32:cl`
LABEL_NAMES = ["background", "organ", "tumour"]


def vm_rss_mb() -> float:
    """The process's resident memory now, in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_busy(seconds: float = 2.0) -> float:
    """Share of all CPUs' time spent busy (by any process) over the next `seconds`, from /proc/stat."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_until_quiet(max_busy: float, max_wait: float) -> float:
    """Wait (up to `max_wait` s) until other work leaves the CPUs at most `max_busy` busy; returns the last reading."""
    deadline = time.monotonic() + max_wait
    while (busy := cpu_busy()) > max_busy and time.monotonic() < deadline:
        time.sleep(3)
    return busy


class StepTimer(pl.Callback):
    """Times training steps and the precision plugin's work outside the closure; records peak memory and loss.

    Step time is the interval between consecutive `on_train_batch_end` calls (the whole step: batch transfer,
    forward, backward, optimizer, Lightning's bookkeeping). On CUDA it is read from CUDA events, so the timer adds
    no host synchronisation. "Optimizer time" is the precision plugin's `optimizer_step` minus the closure it runs
    (forward + backward), i.e. grad copy, unscale/inf check, clipping, the optimizer step and the copy back.

    Args:
        warmup: steps left out of the statistics (the first steps allocate, tune cuDNN, compile).
        out: a JSON file written at the end of fit (and updated after test) with `summary()`.
    """

    def __init__(self, warmup: int = 3, out: str | None = None) -> None:
        self.warmup, self.out = warmup, out
        self.cuda = False
        self.ends: list[Any] = []  # per step: perf_counter() or a CUDA event at on_train_batch_end
        self.opt_marks: list[tuple[Any, Any, Any, Any]] = []  # per step: start, closure start/end, end
        self.losses: list[torch.Tensor] = []
        self.base_mb = 0.0
        self.result: dict[str, Any] = {}

    def _mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _ms(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1000.0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.cuda = trainer.strategy.root_device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base_mb = torch.cuda.memory_allocated() / 2**20
        else:
            self.base_mb = vm_rss_mb()
        plugin = trainer.strategy.precision_plugin
        step = plugin.optimizer_step  # bound method of this plugin instance; wrapped for this fit only

        def timed_step(optimizer, model, closure, **kwargs):
            marks: list[Any] = [self._mark()]

            def timed_closure():
                marks.append(self._mark())
                result = closure()
                marks.append(self._mark())
                return result

            result = step(optimizer, model, timed_closure, **kwargs)
            marks.append(self._mark())
            if len(marks) == 4:
                self.opt_marks.append(tuple(marks))
            return result

        plugin.optimizer_step = timed_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(self._mark())
        if isinstance(outputs, dict) and "loss" in outputs:
            self.losses.append(outputs["loss"].detach())

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a partial result, so a run stopped by a time limit still reports its numbers so far
        if self.out and not trainer.sanity_checking and len(self.ends) > self.warmup + 1:
            self.result = self.summary(trainer)
            self._write()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.result = self.summary(trainer)
        self._write()

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/dice")}
        self.result.update(metrics)
        self._write()

    def _write(self) -> None:
        if self.out and self.result:
            Path(self.out).write_text(json.dumps(self.result, indent=1))

    def summary(self, trainer: pl.Trainer | None = None) -> dict[str, Any]:
        """`{"step_ms", "opt_ms", "opt_share", "peak_mb", "loss", "steps", ...}` medians over the timed steps."""
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20 - self.base_mb
        else:
            peak = peak_rss_mb() - self.base_mb
        steps = [self._ms(a, b) for a, b in zip(self.ends, self.ends[1:], strict=False)][max(self.warmup - 1, 0) :]
        opt = [self._ms(s, e) - self._ms(c0, c1) for s, c0, c1, e in self.opt_marks][self.warmup :]
        step_ms = statistics.median(steps) if steps else float("nan")
        opt_ms = statistics.median(opt) if opt else float("nan")
        result = {
            "steps": len(steps),
            "step_ms": step_ms,
            "step_ms_min": min(steps) if steps else float("nan"),
            "step_times": steps,
            "opt_times": opt,
            "opt_ms": opt_ms,
            "opt_share": opt_ms / step_ms if steps and opt else float("nan"),
            "peak_mb": peak,
            "loss": float(self.losses[-1]) if self.losses else float("nan"),
        }
        if trainer is not None:
            result["precision"] = str(trainer.precision)
            scaler = getattr(trainer.precision_plugin, "scaler", None)  # ours; Lightning AMP has a GradScaler
            if hasattr(scaler, "skipped_steps"):
                result["skipped_steps"] = scaler.skipped_steps
            metrics = trainer.callback_metrics
            if "val/dice" in metrics:
                result["val_dice"] = float(metrics["val/dice"])
            if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.best_model_score is not None:
                result["best_val_dice"] = float(trainer.checkpoint_callback.best_model_score)
        return result


class FixedBatches(Dataset):
    """`length` steps cycling over a few ready-made batches (DataLoader(batch_size=None) passes them through)."""

    def __init__(self, batches: list[dict[str, torch.Tensor]], length: int) -> None:
        self.batches, self.length = batches, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.batches[index % len(self.batches)]


def synthetic_batches(
    n: int, batch: int, patch: int, seed: int, device: str, channels_last: bool
) -> list[dict[str, torch.Tensor]]:
    """`n` batches of a sphere of class 1 holding a smaller sphere of class 2, in Gaussian noise.

    Returns dicts with "image" float32 (B, 1, P, P, P) and "label" int64 (B, 1, P, P, P) in {0, 1, 2}.
    """
    gen = torch.Generator().manual_seed(seed)
    axis = torch.arange(patch, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"))  # (3, P, P, P)
    batches = []
    for _ in range(n):
        images, labels = [], []
        for _ in range(batch):
            centre = patch * (0.35 + 0.3 * torch.rand(3, 1, 1, 1, generator=gen))
            radius = patch * (0.15 + 0.1 * torch.rand(1, generator=gen))
            dist = (grid - centre).square().sum(0).sqrt()
            label = (dist < radius).long() + (dist < radius / 2).long()
            image = label.float() + 0.7 * torch.randn(label.shape, generator=gen)
            images.append(image[None])
            labels.append(label[None])
        image = torch.stack(images).to(device)
        if channels_last:
            image = image.contiguous(memory_format=torch.channels_last_3d)
        batches.append({"image": image, "label": torch.stack(labels).to(device)})
    return batches


def model_config(model: str) -> Any:
    """`conf/model/<model>.yaml` as Hydra composes it: its base (conf/model_base/) with the file's own keys over it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        return compose(config_name=f"model/{model}").model


def build_module(
    model: str, patch: int, fused: bool = False, channels_last: bool = False, compile: bool = False
) -> pl.LightningModule:
    """medseg's SegmentationModule from `conf/model/<model>.yaml` (net, loss, optimizer, schedule as users get);
    `fused` sets the optimizer's `fused=True` (one kernel per step for all parameters); `channels_last` and
    `compile` are the module's own options (`model.channels_last`, `model.compile`)."""
    from hydra.utils import instantiate

    cfg = model_config(model)
    cfg.net.in_channels, cfg.net.out_channels = 1, len(LABEL_NAMES)
    if fused:
        cfg.optimizer.fused = True
    if model == "dynunet":
        cfg.net.patch_size, cfg.net.spacing = [patch] * 3, [1.0, 1.0, 1.0]
    make = instantiate(cfg, _partial_=True)
    return make(label_names=LABEL_NAMES, roi_size=[patch] * 3, channels_last=channels_last, compile=compile)


def precision_kwargs(mode: str, device: str, norms_in_float32: bool = False) -> dict[str, Any]:
    """Trainer kwargs for a mode, from `conf/precision/<mode>.yaml` exactly as `+precision=<mode>` composes it."""
    from hydra import compose, initialize_config_dir

    from medseg.train import precision_kwargs as trainer_precision

    overrides = [f"+precision={mode}"]
    if mode == "half" and device == "cuda":
        overrides.append("precision.lightning=16-true")  # conf/precision/half.yaml's GPU setting
    if norms_in_float32:
        overrides.append("precision.plugin.norms_in_float32=true")
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    return trainer_precision(cfg.precision)


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """One `trainer.fit` of `spec["warmup"] + spec["steps"]` steps; returns StepTimer's summary plus the spec."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    mode, *options = spec["mode"].split(":")
    unknown = set(options) - set(OPTIONS)
    if unknown or ("normfp32" in options and mode != "mixed"):
        raise ValueError(f"{spec['mode']}: options are {OPTIONS} (normfp32 with mixed only)")
    channels_last = spec["channels_last"] or "cl" in options
    device = spec["device"]
    torch.backends.cudnn.benchmark = bool(spec.get("cudnn_benchmark"))  # set every run: runs may share a process
    pl.seed_everything(spec["seed"], workers=True, verbose=False)
    batches = synthetic_batches(4, spec["batch"], spec["patch"], spec["seed"], device, channels_last)
    compile = spec["compile"] or "compile" in options
    module = build_module(spec["model"], spec["patch"], "fused" in options, channels_last, compile)
    timer = StepTimer(warmup=spec["warmup"])
    total = spec["warmup"] + spec["steps"]
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        max_steps=total,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        gradient_clip_val=12.0,  # conf/trainer/default.yaml's, so the clipping cost is in the step
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        **precision_kwargs(mode, device, norms_in_float32="normfp32" in options),
    )
    loader = torch.utils.data.DataLoader(FixedBatches(batches, total), batch_size=None)
    profile = spec.get("profile")
    if profile:
        from torch.profiler import ProfilerActivity, schedule
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        sched = schedule(wait=spec["warmup"], warmup=1, active=sched_steps(spec), repeat=1)
        with torch_profile(activities=activities, schedule=sched, record_shapes=False) as prof:
            timer.on_train_batch_end = _also(timer.on_train_batch_end, prof.step)
            trainer.fit(module, train_dataloaders=loader)
        sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
        averages = prof.key_averages()
        Path(profile).write_text(
            profile_summary(averages, steps=sched_steps(spec)) + "\n\n" + averages.table(sort_by=sort, row_limit=40)
        )
    else:
        trainer.fit(module, train_dataloaders=loader)
    result = dict(spec)
    result.update(timer.result)
    result["voxels_per_s"] = spec["batch"] * spec["patch"] ** 3 / (result["step_ms"] / 1000.0)
    return result


# Where a step's CPU time goes, by aten op name (self time, so nothing is counted twice).
PROFILE_GROUPS = {  # first match wins
    "conv backward": ("convolution_backward",),
    "conv forward": ("mkldnn_convolution", "_convolution", "convolution", "cudnn_convolution", "slow_conv"),
    "norm": ("batch_norm", "instance_norm"),
    "dtype casts / copies": ("copy_", "_to_copy"),
    "activation (PReLU)": ("prelu",),
    "loss": ("softmax", "nll_loss", "one_hot", "scatter"),
    "optimizer + clip + plugin": ("_foreach", "addcdiv", "addcmul", "lerp", "sqrt", "_amp_", "vector_norm", "_fused"),
}


def sched_steps(spec: dict[str, Any]) -> int:
    return max(spec["steps"] - 1, 1)


def profile_summary(averages, steps: int) -> str:
    """A Markdown table of self CPU time per op group, per step, from `prof.key_averages()`."""
    totals: dict[str, float] = {}
    for event in averages:
        name = event.key.removeprefix("aten::")
        group = next((g for g, keys in PROFILE_GROUPS.items() if any(k in name for k in keys)), "other")
        if event.key.startswith(("ProfilerStep", "autograd::", "Optimizer.")):
            group = "other"  # wrappers: their self time is Python/dispatch overhead
        totals[group] = totals.get(group, 0.0) + event.self_cpu_time_total / 1000 / steps
    whole = sum(totals.values())
    rows = [
        {"op group": group, "ms per step": f"{ms:.0f}", "share": f"{100 * ms / whole:.1f}%"}
        for group, ms in sorted(totals.items(), key=lambda kv: -kv[1])
    ]
    rows.append({"op group": "total (self CPU time)", "ms per step": f"{whole:.0f}", "share": "100%"})
    return markdown_table(rows)


def _also(hook, extra):
    def both(*args, **kwargs):
        hook(*args, **kwargs)
        extra()

    return both


def pool(runs: list[dict[str, Any]], stat: str = "median") -> dict[str, Any]:
    """One result from repeated runs of a mode: the timed steps of every run pooled, peak memory their median."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    steps = [t for r in ok for t in r["step_times"]]
    opt = [t for r in ok for t in r["opt_times"]]
    result = dict(ok[-1], runs=len(ok), steps=len(steps), step_times=steps, opt_times=opt)
    result["step_ms"] = statistics.median(steps) if stat == "median" else min(steps)
    result["step_ms_min"] = min(steps)
    # a skipped step (inf/NaN gradients: the advisor runs the closure again) has no optimizer time, as in `summary`
    result["opt_ms"] = (statistics.median(opt) if stat == "median" else min(opt)) if opt else float("nan")
    result["opt_share"] = result["opt_ms"] / result["step_ms"]
    result["peak_mb"] = statistics.median(r["peak_mb"] for r in ok)
    result["voxels_per_s"] = result["batch"] * result["patch"] ** 3 / (result["step_ms"] / 1000.0)
    return result


def run_isolated(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """`run_one` in a fresh Python process, so peak memory and allocator state are that run's alone."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(spec, error=f"timed out after {timeout:.0f} s")
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return dict(spec, error=" | ".join(tail) or f"exit code {proc.returncode}")


def run_in_process(spec: dict[str, Any]) -> dict[str, Any]:
    """`run_one` here (CUDA: saves a process start per run; peak memory is measured from each run's own base)."""
    import gc

    try:
        return run_one(spec)
    except Exception as err:  # one failing mode must not lose the others' numbers
        return dict(spec, error=f"{type(err).__name__}: {err}"[:200])
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


COLUMNS = [
    "model",
    "patch",
    "mode",
    "precision",
    "step ms",
    "Mvox/s",
    "time/fp32",
    "time/amp",
    "peak MiB",
    "mem/fp32",
    "mem/amp",
    "opt ms",
    "opt %",
    "loss@K",
]


def table(results: list[dict[str, Any]]) -> str:
    """A Markdown table, one row per run; ratios against fp32 and amp of the same model and patch."""

    def ref(r: dict[str, Any], mode: str) -> dict[str, Any]:
        for other in results:
            if (other["model"], other["patch"], other["mode"]) == (r["model"], r["patch"], mode):
                return other
        return {}

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}" if a and b else "-"

    rows = []
    for r in results:
        head = [r["model"], f"{r['patch']}^3 x{r['batch']}", r["mode"]]
        if "error" in r:
            rows.append(dict(zip(COLUMNS, head + [f"error: {r['error']}"], strict=False)))
            continue
        fp32, amp = ref(r, "fp32"), ref(r, "amp")
        cells = head + [
            r["precision"],
            f"{r['step_ms']:.1f}",
            f"{r['voxels_per_s'] / 1e6:.2f}",
            ratio(r["step_ms"], fp32.get("step_ms")),
            ratio(r["step_ms"], amp.get("step_ms")),
            f"{r['peak_mb']:.0f}",
            ratio(r["peak_mb"], fp32.get("peak_mb")),
            ratio(r["peak_mb"], amp.get("peak_mb")),
            f"{r['opt_ms']:.1f}",
            f"{100 * r['opt_share']:.1f}",
            f"{r['loss']:.4f}",
        ]
        rows.append(dict(zip(COLUMNS, cells, strict=True)))
    return markdown_table(rows, COLUMNS)


def machine(device: str) -> str:
    """CPU model and thread count, or the GPU's name, for the table's header."""
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()})"
    cpu = platform.processor() or "cpu"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=list(MODES), help="fp32 amp bf16 half mixed [:option...]")
    parser.add_argument("--patch", nargs="+", type=int, default=[64, 96, 128], help="cubic patch sizes")
    parser.add_argument("--model", nargs="+", default=["unet"], choices=["unet", "dynunet"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed steps after warm-up")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--channels-last", action="store_true", help="channels-last 3D model and input, every mode")
    parser.add_argument("--compile", action="store_true", help="torch.compile the net, every mode")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-wait",
        type=float,
        default=0,
        help="before each run wait up to this many seconds for the CPUs to be at most --max-busy busy (shared CPU)",
    )
    parser.add_argument("--max-busy", type=float, default=0.1)
    parser.add_argument("--repeat", type=int, default=1, help="runs per mode, interleaved; their steps are pooled")
    parser.add_argument(
        "--stat",
        choices=["median", "min"],
        default="median",
        help="step time statistic (min: the least disturbed step, for a CPU shared with other work)",
    )
    parser.add_argument("--profile", help="write a torch.profiler table of the timed steps here (single run)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument(
        "--isolate",
        choices=["auto", "yes", "no"],
        default="auto",
        help="a fresh process per run (auto: on CPU, where peak RSS needs it; on CUDA peak stats are reset per run)",
    )
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_one(json.loads(args.child))), flush=True)
        return []
    for mode in args.modes:
        if mode.split(":")[0] not in MODES:
            parser.error(f"unknown mode {mode!r}; choose from {MODES} with optional suffixes {OPTIONS}")

    isolate = args.isolate == "yes" or (args.isolate == "auto" and args.device == "cpu")
    results: list[dict[str, Any]] = []
    print(f"# {machine(args.device)}; load average {os.getloadavg()[0]:.2f}", flush=True)
    runs: dict[tuple, list[dict[str, Any]]] = {}
    for _ in range(args.repeat):
        for model, patch, mode in itertools.product(args.model, args.patch, args.modes):
            spec = {
                "model": model,
                "patch": patch,
                "mode": mode,
                "batch": args.batch,
                "steps": args.steps,
                "warmup": args.warmup,
                "device": args.device,
                "channels_last": args.channels_last,
                "compile": args.compile,
                "cudnn_benchmark": args.cudnn_benchmark,
                "seed": args.seed,
                "profile": args.profile,
            }
            busy = wait_until_quiet(args.max_busy, args.max_wait) if args.max_wait > 0 else float("nan")
            started = time.perf_counter()
            r = run_isolated(spec, args.timeout) if isolate else run_in_process(spec)
            r["cpu_busy_before"] = busy
            took = time.perf_counter() - started
            status = r.get("error") or (
                f"{r['step_ms']:.1f} ms/step (min {r['step_ms_min']:.1f}), peak {r['peak_mb']:.0f} MiB,"
                f" opt {100 * r['opt_share']:.1f}%, loss {r['loss']:.4f}"
                + (f", {r['skipped_steps']} skipped steps" if "skipped_steps" in r else "")
            )
            load = f"load {os.getloadavg()[0]:.2f}, CPUs {100 * busy:.0f}% busy before"
            print(f"  {model} {patch}^3 {mode}: {status} ({took:.0f} s, {load})", flush=True)
            runs.setdefault((model, patch, mode), []).append(r)
            results = [pool(rs, args.stat) for rs in runs.values()]
            if args.json:  # after every run, so a run cut short by a time limit keeps what it measured
                Path(args.json).write_text(json.dumps({"runs": list(runs.values()), "results": results}, indent=1))
    flags = " channels-last" * args.channels_last + " compile" * args.compile
    stat = "median" if args.stat == "median" else "fastest"
    print(
        f"\n{args.device}, batch {args.batch}, step time: {stat} of {args.steps} steps after {args.warmup} warm-up"
        f" x {args.repeat} run(s) per mode (interleaved){flags}"
    )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(table(results), flush=True)
    return results


if __name__ == "__main__":
    main()
