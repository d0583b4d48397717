"""The main job itself, twice: `python -m medseg.train` on the default synthetic data, FP32 and `+precision=mixed`,
same seed and steps. Slow (two runs of a few minutes each on 2 CPU cores): `pytest -m slow`."""

import time

import pytest

from medseg.tracking.runs import load_run

from .helpers import output, run_cli


@pytest.mark.slow
def test_mixed_reaches_fp32_dice_on_synthetic_data(tmp_path, record_property):
    dice = {}
    for name, extra in (("fp32", []), ("mixed", ["+precision=mixed"])):
        run_dir = tmp_path / name
        start = time.monotonic()
        result = run_cli("logger=csv", "test=false", f"hydra.run.dir={run_dir}", *extra, timeout=1200)
        assert result.returncode == 0, output(result)
        dice[name] = load_run(run_dir).best("val/dice")
        record_property(f"{name}_best_val_dice", dice[name])
        record_property(f"{name}_seconds", round(time.monotonic() - start))
    assert dice["fp32"] >= 0.85 and dice["mixed"] >= 0.85, dice  # the main job's acceptance bar
    assert abs(dice["mixed"] - dice["fp32"]) <= 0.02, dice
