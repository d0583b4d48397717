"""SIGTERM or Ctrl-C mid-epoch, then `ckpt_path=last`: the resumed run ends bit-identical to an uninterrupted one."""

import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.data.synthetic import LABELS, make_case

from .conftest import TINY, TINY_UNET

STEPS = 10


@pytest.fixture(scope="module")
def identical_cases(tmp_path_factory):
    """Four copies of one 32^3 case already at the target spacing and orientation, so that the patch sampler
    has one choice and the data order within an epoch cannot change the result (Lightning restarts an
    interrupted epoch's data from its first batch)."""
    import json

    root = tmp_path_factory.mktemp("identical")
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    image, label = make_case(np.random.default_rng(3), (32, 32, 32))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    training = []
    for i in range(4):
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"c{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"c{i}.nii.gz")
        training.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    meta = {"modality": {"0": "MRI"}, "labels": LABELS, "training": training}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _cmd(dataset, logs, run_dir, *extra):
    return [
        sys.executable, "-m", "medseg.train", *TINY, *TINY_UNET,
        f"data.root={dataset}", "++data.synthesize=null", f"data.cache_dir={logs}/cache", "data.cache=none",
        "data.spacing=[2,2,2]", "data.val_fraction=0.25", "data.batch_size=1", "data.num_samples=1",
        "data.flip_axes=[]", "data.affine_prob=0", "data.intensity_prob=0", "data.patch_size=[32,32,32]",
        f"trainer.max_steps={STEPS}", "trainer.max_epochs=-1", "trainer.check_val_every_n_epoch=100",
        "trainer.deterministic=true", "test=false", "+precision=mixed", "precision.plugin.dtype=float16",
        "precision.plugin.scaler.init_scale=16777216", "precision.plugin.scaler.growth_interval=2",
        f"paths.log_dir={logs}", f"hydra.run.dir={run_dir}", *extra,
    ]  # fmt: skip


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
    assert a[2]["scaler"]["overflows"] > 0  # 2**24 overflows FP16: the scaler did real work
    for pa, pb in zip(a[3][0]["state"].values(), b[3][0]["state"].values(), strict=True):
        for k in pa:
            assert torch.equal(torch.as_tensor(pa[k]), torch.as_tensor(pb[k])), k


@pytest.fixture(scope="module")
def uninterrupted(identical_cases, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    result = subprocess.run(_cmd(identical_cases, tmp / "logs", tmp / "run"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return _state(tmp / "run" / "checkpoints" / "last.ckpt")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_interrupt_and_resume_is_exact(sig, identical_cases, uninterrupted, tmp_path):
    logs, step_file = tmp_path / "logs", tmp_path / "step"
    runs = logs / "train" / "runs"
    slow = [
        "+callbacks.step_file._target_=tests.helpers.StepFile",
        f"+callbacks.step_file.path={step_file}",
        "+callbacks.step_file.sleep=0.5",
    ]
    proc = subprocess.Popen(
        _cmd(identical_cases, logs, runs / "run1", *slow), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
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

    result = subprocess.run(
        _cmd(identical_cases, logs, runs / "run2", "ckpt_path=last"), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_identical(_state(runs / "run2" / "checkpoints" / "last.ckpt"), uninterrupted)
