"""Faults: NaN that is not an overflow, corrupted or malicious checkpoints, unwritable output, bad settings."""

import os
import pickle

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.checkpoint import CheckpointError, load_checkpoint
from medseg.config_check import ConfigError, check_output_dir
from medseg.data.synthetic import write_synthetic_dataset
from medseg.train import train

from .helpers import TINY, TINY_UNET, on_dataset, run_cli


def _nan_dataset(tmp_path):
    """4 synthetic cases with a 4^3 block of NaN voxels in every image (the data checks would refuse them)."""
    root = write_synthetic_dataset(tmp_path / "nan", num_cases=4, min_size=32, max_size=34)
    for path in sorted((root / "imagesTr").glob("*.nii.gz")):
        img = nib.load(path)
        data = np.asarray(img.dataobj).copy()
        data[5:9, 5:9, 5:9] = np.nan
        nib.save(nib.Nifti1Image(data, img.affine), path)
    return root


def test_nan_input_stops_the_run_naming_step_and_checkpoint(tmp_path, tiny_cfg, caplog):
    """NaN voxels (data checks switched off) make every step's gradients NaN: the plugin skips them, then stops
    after max_consecutive_skips instead of training on, and the log names the last good checkpoint."""
    root = _nan_dataset(tmp_path)
    cfg = tiny_cfg(f"data.root={root}", "data.validate=false", "data.val_fraction=0.25", "data.batch_size=1",
                   "+precision=mixed", "precision.plugin.max_consecutive_skips=3", "trainer.max_epochs=5")  # fmt: skip
    with pytest.raises(RuntimeError, match=r"global step \d+: 3 steps in a row were skipped"):
        train(cfg)
    assert "Last good checkpoint" in caplog.text


def test_nan_voxels_are_caught_before_training(tmp_path, tiny_cfg):
    root = write_synthetic_dataset(tmp_path / "nan", num_cases=4, min_size=32, max_size=34)
    path = sorted((root / "imagesTr").glob("*.nii.gz"))[1]
    img = nib.load(path)
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = np.inf
    nib.save(nib.Nifti1Image(data, img.affine), path)
    with pytest.raises(ValueError, match=rf"{path.name}.*(NaN|Inf)"):
        train(tiny_cfg(f"data.root={root}"))


def test_corrupted_checkpoint_is_named(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"inference": {}}}, good)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(CheckpointError, match="bad.ckpt.*(truncated|corrupted)"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="missing.ckpt: checkpoint not found"):
        load_checkpoint(tmp_path / "missing.ckpt")


class _RunsCode:
    """Unpickling this calls `open(marker, 'w')`: what a malicious checkpoint would do with os.system."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    with evil.open("wb") as f:
        torch.save({"state_dict": {}, "hyper_parameters": {"inference": {}}, "x": _RunsCode(marker)}, f,
                   pickle_module=pickle)  # fmt: skip
    with pytest.raises(CheckpointError, match="evil.ckpt: refusing to unpickle.*allow_unsafe_checkpoint=true"):
        load_checkpoint(evil)
    assert not marker.exists()
    load_checkpoint(evil, allow_unsafe=True)  # the explicit opt-in does unpickle (and so runs the code)
    assert marker.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_output_dir_fails_before_training(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="paths.output_dir: cannot write"):
            check_output_dir(tmp_path / "run")
    finally:
        tmp_path.chmod(0o700)


def test_unwritable_output_dir_fails_before_training(tmp_path):
    """A regular file where the run directory should be: the same early, one-line error (also as root)."""
    (tmp_path / "run").write_text("")
    with pytest.raises(ConfigError, match="paths.output_dir: cannot write"):
        check_output_dir(tmp_path / "run" / "sub")


def test_full_disk_fails_before_training(tmp_path):
    with pytest.raises(ConfigError, match="paths.output_dir: only .* MB free"):
        check_output_dir(tmp_path, min_free_mb=10**12)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.optimizer.lr=-0.1", "model.optimizer.lr: must be > 0"),
        ("+precision.plugin.loss_scal=2", "precision.plugin.loss_scal: unknown option for medseg.precision"),
        ("++model.optimizer.lrr=0.1", "model.optimizer.lrr: unknown option for torch.optim.AdamW"),
        ("data.patch_size=[30,32,32]", "data.patch_size: .* must be divisible by 4"),
        ("data.patch_size=[96,96,96]", "data.patch_size: .* larger than every image"),
        ("model.test_mirror_axes=[0,3]", r"model.test_mirror_axes: must list spatial axes 0, 1 or 2, got \[0, 3\]"),
        ("model.test_mirror_axes=[x]", "model.test_mirror_axes: invalid literal"),
        ("model.channels_last=sideways", "model.channels_last: must be true, false or 'auto', got 'sideways'"),
        (
            "model=swinunetr",
            r"data.patch_size: \[32, 32, 32\] cannot go through SwinUNETR: sizes must be multiples of 32 with more"
            r" than one voxel at the bottleneck, e.g. \[64, 32, 32\]",
        ),
        ("model=unetr data.patch_size=[40,32,32]", r"UNETR: sizes must be multiples of 16, e.g. \[48, 32, 32\]"),
        ("+precision=mixed precision.plugin.precision_plan=/no/x.yaml", "precision plan /no/x.yaml: cannot read"),
    ],
)
def test_bad_settings_fail_naming_the_key(override, message, tiny_cfg):
    extra = ["+precision=mixed"] if override.startswith("+precision.") else []
    with pytest.raises(ValueError, match=message):
        train(tiny_cfg(*extra, *override.split()))


@pytest.mark.parametrize(
    "override, message",
    [
        ("model=nosuch", "Could not find 'model/nosuch'"),
        ("model.optimizer.lr=-1", "medseg: model.optimizer.lr: must be > 0"),
        ("data.root=/nonexistent/Task99", "dataset.json"),
        ("model.test_mirror_axes=[5]", "medseg: model.test_mirror_axes: must list spatial axes"),
        (
            "+precision=mixed precision.plugin.fp32_modules=[net.nothing.*]",
            "medseg: precision.plugin.fp32_modules: no module of SegmentationModule matches ['net.nothing.*']",
        ),
    ],
)
def test_cli_errors_are_one_message_without_traceback(override, message, tiny_dataset, tmp_path):
    """From the shell, a bad setting prints one message naming it, exits non-zero and leaves no run behind."""
    run_dir = tmp_path / "run"
    dataset = on_dataset(tiny_dataset, tmp_path / "cache")
    result = run_cli(*TINY, *TINY_UNET, *dataset, f"hydra.run.dir={run_dir}", *override.split(), timeout=120)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not run_dir.exists()


@pytest.mark.parametrize("precision", ["fp32", "amp", "bf16", "half"])
def test_nan_loss_stops_every_precision(precision, tmp_path, tiny_cfg, caplog):
    """Lightning's own precisions train on through NaN; NonFiniteLossGuard skips those updates (the recovery
    checkpoint written meanwhile keeps finite weights) and stops as the mixed plugin does, naming the step and
    the last good checkpoint."""
    root = _nan_dataset(tmp_path)
    cfg = tiny_cfg(f"data.root={root}", "data.validate=false", "data.val_fraction=0.25", "data.batch_size=1",
                   f"+precision={precision}", "callbacks.nonfinite_guard.max_consecutive_skips=3",
                   "callbacks.recovery_checkpoint.train_time_interval=null",
                   "callbacks.recovery_checkpoint.every_n_train_steps=1", "trainer.max_epochs=5")  # fmt: skip
    with pytest.raises(RuntimeError, match=r"NonFiniteLossGuard: inf/NaN loss at global step 2: 3 steps in a row"):
        train(cfg)
    recovery = f"{cfg.paths.output_dir}/checkpoints/recovery.ckpt"
    assert f"Last good checkpoint: {recovery}" in caplog.text
    state = torch.load(recovery, weights_only=True)
    assert state["global_step"] == 2 and all(v.isfinite().all() for v in state["state_dict"].values())
