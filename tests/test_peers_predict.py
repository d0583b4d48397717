"""benchmarks/peers/predict_speed.py: prediction time and memory beside nnU-Net v2. The fast tests check what decides
fairness (medseg predicts with nnU-Net's planned network on the same axes; a runaway command is stopped); the slow
one runs the smoke comparison, nnunetv2 installed into its own venv."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from medseg import REPO_ROOT

PEERS = REPO_ROOT / "benchmarks" / "peers"

# nnU-Net's 3d_fullres plan of an anisotropic CT (z coarser): lists in its array order z, y, x
PLAN = {
    "spacing": [2.5, 0.8, 0.8],
    "patch_size": [32, 64, 48],
    "architecture": {
        "arch_kwargs": {
            "n_stages": 3,
            "features_per_stage": [8, 16, 32],
            "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
            "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
        }
    },
}
DATASET = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "spleen": 2}}


@pytest.fixture
def speed(monkeypatch):
    monkeypatch.syspath_prepend(str(PEERS))
    import predict_speed

    return predict_speed


def test_medseg_runs_nnunets_planned_network_on_its_own_axes(speed, tmp_path: Path) -> None:
    """The plan's z, y, x lists become medseg's x, y, z: the 1-wide kernel and the unstrided axis land on z, the
    patch and spacing are reversed, and medseg's Predictor loads the checkpoint and maps a patch to C channels."""
    from medseg.inference.predictor import Predictor

    ckpt = speed.medseg_checkpoint(PLAN, DATASET, tmp_path / "random.ckpt")
    info = torch.load(ckpt, weights_only=True)["hyper_parameters"]["inference"]
    assert info["patch_size"] == [48, 64, 32] and info["spacing"] == [0.8, 0.8, 2.5]
    assert info["net"]["kernel_size"][0] == [3, 3, 1] and info["net"]["strides"][1] == [2, 2, 1]
    assert info["label_names"] == ["background", "liver", "spleen"]
    predictor = Predictor(str(ckpt), "cpu", mirror_axes=[], dtype="fp32")
    with torch.no_grad():
        out = predictor.nets[0](torch.zeros(1, 1, 48, 64, 32))
    assert out.shape == (1, 3, 48, 64, 32)


def test_a_command_past_the_memory_limit_is_stopped_with_its_children(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(PEERS))
    from timed import MemoryLimitExceeded, run_timed

    child = "import time; b = bytearray(400 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(60)"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"
    start = time.perf_counter()
    with pytest.raises(MemoryLimitExceeded) as err:
        run_timed([sys.executable, "-c", parent], tmp_path / "log.txt", max_mib=200)
    assert err.value.peak_mib > 200 and time.perf_counter() - start < 30
    time.sleep(0.5)
    left = [
        p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] and "time.sleep(60)" in p.info["cmdline"][-1]
    ]
    assert left == []


def test_bad_shape_stops_with_one_line(speed, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        speed.parse_args(["--work", str(tmp_path), "--shape", "512x512"])
    assert "--shape must be XxYxZ" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        speed.parse_args(["--work", str(tmp_path), "--classes", "300"])
    assert "--classes must be in [2, 256]" in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_prediction_comparison_runs_end_to_end(tmp_path: Path, monkeypatch) -> None:
    """`predict_speed.py --smoke`: nnU-Net plans two class counts, both tools predict the same CT with and without
    mirroring, each writes one mask on the CT's grid, and one table compares them."""
    monkeypatch.syspath_prepend(str(PEERS))
    import nibabel as nib
    import nnunet_env

    reason = nnunet_env.why_not_installable()
    if reason:
        pytest.skip(reason)
    work = tmp_path / "work"
    venv = Path(os.environ.get("MEDSEG_PEERS_VENV", work / "venv"))
    cmd = [sys.executable, str(PEERS / "predict_speed.py"), "--smoke", "--work", str(work), "--venv", str(venv)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "(SMOKE: not a result)" in done.stdout and "| classes | tool | dtype | mirroring |" in done.stdout
    results = json.loads((work / "predict_speed.json").read_text())
    assert len(results) == 2 * 6
    for classes in (3, 8):
        image = nib.load(work / f"ct{classes}" / "msd_source" / "imagesTr" / "ct_0000.nii.gz")
        for folder in (work / f"ct{classes}" / "predictions").glob("*_*_*"):
            if folder.is_dir() and not folder.name.endswith("_hydra"):
                masks = list(folder.glob("*.nii.gz"))
                assert len(masks) == 1, folder
                mask = nib.load(masks[0])
                assert mask.shape == image.shape and abs(mask.affine - image.affine).max() < 1e-3, folder
                assert int(mask.get_fdata().max()) < classes
        assert results[f"{classes}/nnU-Net v2/fp32/none"]["seconds"] > 0
