"""Real `python -m medseg.train` runs side by side, one per precision: validation Dice, step time, peak memory.

    python benchmarks/train_compare.py --modes fp32 amp mixed -- trainer=gpu trainer.max_epochs=40

Everything after `--` is passed to every run as Hydra overrides; each run adds `+precision=<mode>`, a CSV logger
and `benchmarks.precision.StepTimer` as a callback (median step time after warm-up, the precision plugin's share,
peak memory: CUDA `max_memory_allocated`, CPU peak RSS of the main process). Same seed, data and steps for every
mode, so the Dice columns compare like with like (issue 3: `mixed` within 0.02 of `fp32`). `skipped` and `NaN
steps` are PrecisionMonitor's counts; `FP32 modules` the length of the run's precision_plan.yaml (the advisor's).
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from medseg.tracking.tables import markdown_table

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_mode(mode: str, run_dir: Path, overrides: list[str], warmup: int, timeout: float | None) -> dict:
    timer_json = run_dir / "timer.json"
    cmd = [
        sys.executable,
        "-m",
        "medseg.train",
        f"+precision={mode}",
        "logger=csv",
        f"hydra.run.dir={run_dir}",
        "++callbacks.progress_bar=null",
        "trainer.enable_progress_bar=false",
        "++callbacks.step_timer._target_=benchmarks.precision.StepTimer",
        f"++callbacks.step_timer.out={timer_json}",
        f"++callbacks.step_timer.warmup={warmup}",
        *overrides,
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    env.setdefault("WANDB_MODE", "disabled")
    started = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir.parent / f"{mode}.log").open("w") as log:
        try:
            returncode = subprocess.run(
                cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            returncode = "timeout"
    result: dict = {"mode": mode, "wall_s": time.perf_counter() - started, "returncode": returncode}
    if timer_json.is_file():
        result.update(json.loads(timer_json.read_text()))
    metrics_csv = run_dir / "csv" / "metrics.csv"
    if metrics_csv.is_file():
        all_rows = list(csv.DictReader(metrics_csv.open()))
        rows = [r for r in all_rows if r.get("val/dice")]
        if rows:
            result["last_val_dice"] = float(rows[-1]["val/dice"])
        for key in ("skipped_steps", "nan_steps"):  # running counts logged by PrecisionMonitor
            counts = [int(float(r[f"precision/{key}"])) for r in all_rows if r.get(f"precision/{key}")]
            if counts:
                result[key] = counts[-1]
    plan = run_dir / "precision_plan.yaml"
    if plan.is_file():
        result["fp32_modules"] = len(yaml.safe_load(plan.read_text()).get("fp32_modules") or [])
    return result


def table(results: list[dict]) -> str:
    fp32 = next((r for r in results if r["mode"] == "fp32" and "step_ms" in r), None)

    def fmt(r: dict, key: str, spec: str) -> str:
        return format(r[key], spec) if key in r else "-"

    def ratio(r: dict, key: str) -> str:
        return f"{r[key] / fp32[key]:.2f}" if fp32 and key in r and fp32.get(key) else "-"

    def delta(r: dict, key: str) -> str:
        return f"{r[key] - fp32[key]:+.4f}" if fp32 and key in r and key in fp32 else "-"

    rows = [
        {
            "mode": r["mode"], "precision": r.get("precision", "-"), "best val Dice": fmt(r, "best_val_dice", ".4f"),
            "last val Dice": fmt(r, "last_val_dice", ".4f"), "test Dice": fmt(r, "test/dice", ".4f"),
            "Dice - fp32": delta(r, "last_val_dice"), "step ms": fmt(r, "step_ms", ".1f"),
            "time/fp32": ratio(r, "step_ms"), "peak MiB": fmt(r, "peak_mb", ".0f"), "mem/fp32": ratio(r, "peak_mb"),
            "opt %": f"{100 * r['opt_share']:.1f}" if "opt_share" in r else "-", "loss": fmt(r, "loss", ".4f"),
            "skipped": fmt(r, "skipped_steps", "d"), "NaN steps": fmt(r, "nan_steps", "d"),
            "FP32 modules": fmt(r, "fp32_modules", "d"),
            "wall s": f"{r['wall_s']:.0f}", "exit": r["returncode"],
        }
        for r in results
    ]  # fmt: skip
    return markdown_table(rows)


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["fp32", "amp", "mixed"], help="conf/precision/<name>.yaml")
    parser.add_argument("--out", default="logs/train_compare", help="run folders and <mode>.log go here")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the step-time median")
    parser.add_argument("--timeout", type=float, help="seconds per run (its numbers so far are kept)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    results = []
    for mode in args.modes:
        r = run_mode(mode, out / mode, overrides, args.warmup, args.timeout)
        print(f"  {mode}: exit {r['returncode']}, {r['wall_s']:.0f} s", flush=True)
        results.append(r)
    print(f"\nmedseg.train {' '.join(overrides)}")
    print(table(results), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
