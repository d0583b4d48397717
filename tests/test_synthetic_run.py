"""The main job itself, twice: `python -m medseg.train` on the default synthetic data, FP32 and `+precision=mixed`,
same seed and steps. Slow (two runs of a few minutes each on 2 CPU cores): `pytest -m slow`."""

import csv
import subprocess
import sys
import time

import pytest


def _best_val_dice(run_dir) -> float:
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    return max(float(r["val/dice"]) for r in rows if r.get("val/dice"))


@pytest.mark.slow
def test_mixed_reaches_fp32_dice_on_synthetic_data(tmp_path):
    dice = {}
    for name, extra in (("fp32", []), ("mixed", ["+precision=mixed"])):
        run_dir = tmp_path / name
        cmd = [sys.executable, "-m", "medseg.train", "logger=csv", "test=false", f"hydra.run.dir={run_dir}", *extra]
        start = time.monotonic()
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        assert result.returncode == 0, result.stderr[-3000:]
        dice[name] = _best_val_dice(run_dir)
        print(f"{name}: best val Dice {dice[name]:.4f} in {time.monotonic() - start:.0f} s")
    assert dice["fp32"] >= 0.85 and dice["mixed"] >= 0.85, dice  # the main job's acceptance bar
    assert abs(dice["mixed"] - dice["fp32"]) <= 0.02, dice
