"""SIGTERM or Ctrl-C mid-epoch, then `ckpt_path=last`: the resumed run ends bit-identical to an uninterrupted one,
on distinct cases with shuffling, random patches and augmentation on (so the order and randomness of the rest of
the interrupted epoch matter)."""

import signal
import subprocess
import time

import nibabel as nib
import numpy as np
import pytest
import torch

from .conftest import compose_cfg
from .helpers import TINY, TINY_UNET, cli

STEPS = 10


def _cmd(dataset, logs, run_dir, *extra):
    return cli(
        *TINY, *TINY_UNET,
        f"data.root={dataset}", "++data.synthesize=null", f"data.cache_dir={logs}/cache", "data.cache=none",
        "data.spacing=[2,2,2]", "data.val_fraction=0.25", "data.batch_size=1", "data.num_samples=1",
        "data.patch_size=[32,32,32]",
        f"trainer.max_steps={STEPS}", "trainer.max_epochs=-1", "trainer.check_val_every_n_epoch=100",
        "trainer.deterministic=true", "test=false", "+precision=mixed", "precision.plugin.dtype=float16",
        "precision.plugin.scaler.init_scale=16384", "precision.plugin.scaler.growth_interval=2",
        f"paths.log_dir={logs}", f"hydra.run.dir={run_dir}", *extra,
    )  # fmt: skip


def _state(ckpt_path):
    ckpt = torch.load(ckpt_path, weights_only=True)
    return ckpt["global_step"], ckpt["state_dict"], ckpt["MasterWeightPrecision"], ckpt["optimizer_states"]


def _assert_identical(a, b):
    assert a[0] == b[0] == STEPS
    for key in a[1]:
        assert torch.equal(a[1][key], b[1][key]), key
    for ma, mb in zip(a[2]["masters"][0], b[2]["masters"][0], strict=True):
        assert torch.equal(ma, mb)
    assert a[2]["scaler"] == b[2]["scaler"]
    # The scale grows every 2 steps until FP16 overflows: the scaler did real work, and most steps were applied
    # (with every step skipped, as from a huge initial scale, the data could not matter).
    assert a[2]["scaler"]["overflows"] > 0 and a[3][0]["state"][0]["step"] >= STEPS - 3
    for pa, pb in zip(a[3][0]["state"].values(), b[3][0]["state"].values(), strict=True):
        for k in pa:
            assert torch.equal(torch.as_tensor(pa[k]), torch.as_tensor(pb[k])), k


def test_the_data_makes_order_and_randomness_matter(tiny_dataset, tmp_path):
    """Guards the test below against data that hides the problem: the cases differ, augmentation is on."""
    cfg = compose_cfg(_cmd(tiny_dataset, tmp_path, tmp_path / "run")[3:-1], tmp_path / "run")
    assert list(cfg.data.flip_axes) == [0, 1, 2] and cfg.data.affine_prob > 0 and cfg.data.intensity_prob > 0
    images = sorted((tiny_dataset / "imagesTr").glob("*.nii.gz"))
    first, second = (np.asarray(nib.load(p).dataobj) for p in images[:2])
    assert first.shape != second.shape or not np.array_equal(first, second)


@pytest.fixture(scope="module")
def uninterrupted(tiny_dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    result = subprocess.run(_cmd(tiny_dataset, tmp / "logs", tmp / "run"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return _state(tmp / "run" / "checkpoints" / "last.ckpt")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_interrupt_and_resume_is_exact(sig, tiny_dataset, uninterrupted, tmp_path):
    logs, step_file = tmp_path / "logs", tmp_path / "step"
    runs = logs / "train" / "runs"
    slow = [
        "+callbacks.step_file._target_=tests.helpers.StepFile",
        f"+callbacks.step_file.path={step_file}",
        "+callbacks.step_file.sleep=0.5",
    ]
    proc = subprocess.Popen(
        _cmd(tiny_dataset, logs, runs / "run1", *slow), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while not (step_file.exists() and step_file.read_text() and int(step_file.read_text()) >= 4):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    interrupted = runs / "run1" / "checkpoints" / "interrupted.ckpt"
    assert interrupted.is_file(), err[-3000:]
    stopped_at = torch.load(interrupted, weights_only=True)["global_step"]
    assert 4 <= stopped_at < STEPS, stopped_at
    assert "ckpt_path=last" in err + out  # the user is told how to resume

    result = subprocess.run(_cmd(tiny_dataset, logs, runs / "run2", "ckpt_path=last"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_identical(_state(runs / "run2" / "checkpoints" / "last.ckpt"), uninterrupted)
