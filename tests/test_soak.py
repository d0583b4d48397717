"""Soak: SIGKILL a training run at random moments (some in the middle of a checkpoint write), resume it each time
with `ckpt_path=last`; it ends bit-identical to a run never interrupted (weights, FP32 masters, scaler, optimizer)."""

import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from .helpers import TINY, cli

STEPS = 12  # 6 training cases, batch 1: two epochs (trainer.max_epochs=2)
KILLS = ["step", "write", "step", "write", "step"]
PRECISIONS = {
    "mixed": ["+precision=mixed", "precision.plugin.dtype=float16", "precision.plugin.scaler.init_scale=16384",
              "precision.plugin.scaler.growth_interval=2"],
    "fp32": ["+precision=fp32"],
    "amp": ["+precision=amp"],  # bf16 autocast on CPU (Lightning's choice), no GradScaler
}  # fmt: skip


def _cmd(dataset: Path, logs: Path, run_dir: Path, precision: str, *extra: str) -> list[str]:
    """The configuration users run, at its smallest: bounded by epochs, a validation round every epoch, the
    default callbacks (precision and LR monitors), the persistent cache and a loader worker; 16^3 patches, a
    4-8-16 U-Net, a recovery checkpoint every 2 steps."""
    return cli(
        *TINY, *PRECISIONS[precision],
        "model.net.channels=[4,8,16]", "model.net.strides=[2,2]", "model.net.num_res_units=1",
        f"data.root={dataset}", "++data.synthesize=null", f"data.cache_dir={logs.parent / 'cache'}",
        "data.cache=persistent", "data.num_workers=1", "data.spacing=[2,2,2]",
        "data.val_fraction=0.25", "data.batch_size=1", "data.patch_size=[16,16,16]",
        f"trainer.max_epochs={STEPS // 6}", "trainer.check_val_every_n_epoch=1", "trainer.deterministic=true",
        "test=false", "callbacks.recovery_checkpoint.train_time_interval=null",
        "callbacks.recovery_checkpoint.every_n_train_steps=2",
        f"paths.log_dir={logs}", f"hydra.run.dir={run_dir}", *extra,
    )  # fmt: skip


def _wait(proc: subprocess.Popen, ready, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"run ended or stalled before {what}: {proc.communicate()[1][-3000:]}")
        time.sleep(0.01)


def _step(step_file: Path) -> int:
    text = step_file.read_text() if step_file.exists() else ""
    return int(text) if text else -1


@pytest.mark.slow
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_sigkill_anywhere_then_resume_is_exact(precision, tiny_dataset, tmp_path):
    rng = random.Random(f"soak-{precision}")
    reference = subprocess.Popen(  # meanwhile, on the other core
        _cmd(tiny_dataset, tmp_path / "ref_logs", tmp_path / "ref", precision),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    # One run directory, as a requeued job has: the recovery checkpoint is overwritten in place.
    logs, run_dir = tmp_path / "logs", tmp_path / "run"
    step_file, marker = tmp_path / "step", tmp_path / "writing"
    recovery, partial = run_dir / "checkpoints" / "recovery.ckpt", run_dir / "checkpoints" / "recovery.ckpt.tmp"
    killable = [
        "+callbacks.step_file._target_=tests.helpers.StepFile", f"+callbacks.step_file.path={step_file}",
        "checkpoint_io._target_=tests.helpers.SlowCheckpointIO", f"+checkpoint_io.marker={marker}",
    ]  # fmt: skip
    resumed_from = 0
    for i, kill in enumerate(KILLS):
        step_file.unlink(missing_ok=True)
        marker.unlink(missing_ok=True)
        resume = ["ckpt_path=last"] if i else []
        proc = subprocess.Popen(_cmd(tiny_dataset, logs, run_dir, precision, *killable, *resume),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
        if kill == "write":
            _wait(proc, marker.exists, "a checkpoint write")
        else:  # a random moment 1-4 steps after the resumed one (after the first checkpoint, at step 2)
            target = min(max(3, resumed_from + rng.randint(1, 4)), STEPS - 2)
            _wait(proc, lambda t=target: _step(step_file) >= t, f"step {target}")
            time.sleep(rng.uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        if kill == "write":  # killed half way: the new file is partial, the old one complete and in place
            assert partial.is_file() and 0 < partial.stat().st_size
        if recovery.exists():
            resumed_from = torch.load(recovery, weights_only=True)["global_step"]
    assert resumed_from > 0  # the kills did not all land before the first checkpoint

    final = subprocess.run(_cmd(tiny_dataset, logs, run_dir, precision, "ckpt_path=last"), capture_output=True,
                           text=True)  # fmt: skip
    assert final.returncode == 0, final.stderr[-3000:]
    assert reference.wait(timeout=300) == 0, reference.communicate()[1][-3000:]
    _assert_identical(run_dir / "checkpoints" / "last.ckpt", tmp_path / "ref" / "checkpoints" / "last.ckpt")


def _assert_identical(path_a: Path, path_b: Path) -> None:
    a, b = (torch.load(p, weights_only=True) for p in (path_a, path_b))
    assert a["global_step"] == b["global_step"] == STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    [opt_a], [opt_b] = a["optimizer_states"], b["optimizer_states"]
    assert opt_a["state"][0]["step"] >= STEPS - 3  # most steps were applied: the data did matter
    for pa, pb in zip(opt_a["state"].values(), opt_b["state"].values(), strict=True):
        for k in pa:
            assert torch.equal(torch.as_tensor(pa[k]), torch.as_tensor(pb[k])), k
    if (
        "MasterWeightPrecision" in a and "masters" in a["MasterWeightPrecision"]
    ):  # medseg's plugin: FP32 masters and scaler
        for ma, mb in zip(
            a["MasterWeightPrecision"]["masters"][0], b["MasterWeightPrecision"]["masters"][0], strict=True
        ):
            assert torch.equal(ma, mb)
        assert a["MasterWeightPrecision"]["scaler"] == b["MasterWeightPrecision"]["scaler"]
        assert a["MasterWeightPrecision"]["scaler"]["overflows"] > 0
