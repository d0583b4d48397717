"""benchmarks/peers: medseg beside nnU-Net v2. The fast tests check the parts that decide fairness (the same cases
on both sides, a folder nnU-Net's converter accepts, memory of a whole process tree); the slow one runs the whole
comparison in smoke mode, nnunetv2 installed into its own venv."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medseg import REPO_ROOT
from medseg.data.datamodule import MSDDataModule
from medseg.data.synthetic import write_synthetic_dataset

PEERS = REPO_ROOT / "benchmarks" / "peers"


@pytest.fixture
def peers(monkeypatch):
    """benchmarks/peers/nnunet.py as a module (its siblings import each other, as when run as a script)."""
    monkeypatch.syspath_prepend(str(PEERS))
    import nnunet

    return nnunet


def _val_ids(dm: MSDDataModule) -> list[str]:
    return [Path(item["image"]).name.removesuffix(".nii.gz") for item in dm.split()[1]]


@pytest.mark.parametrize("folds", [None, 3])
def test_nnunet_split_is_medsegs(peers, tiny_dataset: Path, folds) -> None:
    """splits_final.json holds exactly the validation cases medseg's data module holds out (seed 42 of conf/)."""
    splits = peers.medseg_split(tiny_dataset, folds)
    assert len(splits) == (folds or 1)
    for fold, split in enumerate(splits):
        dm = MSDDataModule(str(tiny_dataset), patch_size=(16, 16, 16), seed=42, fold=fold, num_folds=folds)
        assert split["val"] == _val_ids(dm)
        assert set(split["train"]) | set(split["val"]) == {f"synthetic_{i:03d}" for i in range(8)}
        assert not set(split["train"]) & set(split["val"])
    if folds:  # every case validated exactly once across the folds
        assert sorted(c for s in splits for c in s["val"]) == sorted(f"synthetic_{i:03d}" for i in range(8))


def test_staged_folder_has_the_name_and_keys_nnunets_converter_needs(peers, tmp_path: Path) -> None:
    """nnUNetv2_convert_MSD_dataset splits the folder name on '_' into Task<id> and a name, and deletes `test`."""
    msd = write_synthetic_dataset(tmp_path / "BraTS_like_2mm", num_cases=2, min_size=8, max_size=8)
    meta = json.loads((msd / "dataset.json").read_text())
    meta.pop("test", None)
    (msd / "dataset.json").write_text(json.dumps(meta))
    staged = peers.stage_msd(msd, tmp_path / "work")
    task, name = staged.name.split("_")  # exactly one underscore
    assert task == f"Task{peers.DATASET_ID}" and name.isalnum()
    assert json.loads((staged / "dataset.json").read_text())["test"] == []
    assert (staged / "imagesTs").is_dir() and sorted(p.name for p in (staged / "imagesTr").iterdir()) == [
        "synthetic_000.nii.gz",
        "synthetic_001.nii.gz",
    ]


def test_run_timed_counts_the_child_processes_memory(monkeypatch, tmp_path: Path) -> None:
    """A parent that starts a child holding ~300 MiB: the peak is the tree's, not the parent's alone."""
    monkeypatch.syspath_prepend(str(PEERS))
    from timed import run_timed

    child = "import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1.5)"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}], check=True)"
    t = run_timed([sys.executable, "-c", parent], tmp_path / "log.txt")
    assert t.peak_mib > 300 and t.seconds >= 1.5
    with pytest.raises(RuntimeError, match="log.txt"):
        run_timed([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "log.txt")


def test_bad_arguments_stop_with_one_line(peers, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        peers.parse_args(["--work", str(tmp_path)])
    assert "an MSD folder is needed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        peers.parse_args([str(tmp_path), "--folds", "5", "--fold", "5"])
    assert "--fold must be in [0, --folds=5)" in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_comparison_runs_end_to_end(peers, tmp_path: Path) -> None:
    """`nnunet.py --smoke`: nnunetv2 installed into its own venv (or $MEDSEG_PEERS_VENV, kept between runs),
    converted, planned, trained and predicted; medseg mixed and fp32 trained and predicted; one table."""
    import nnunet_env
    import report

    reason = nnunet_env.why_not_installable(nnunet_env.NNUNET_VERSION)
    if reason:
        pytest.skip(reason)
    work = tmp_path / "work"
    venv = Path(os.environ.get("MEDSEG_PEERS_VENV", work / "venv"))
    cmd = [sys.executable, str(PEERS / "nnunet.py"), "--smoke", "--step-speed", "--work", str(work)]
    done = subprocess.run(cmd + ["--venv", str(venv)], capture_output=True, text=True, timeout=1800, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "(SMOKE: not a result)" in done.stdout and "| fold | tool | mode | mirroring | Dice organ |" in done.stdout
    rows = json.loads((work / "peers_table.json").read_text())
    got = {(r["tool"], r["mode"], r["mirroring"]) for r in rows}
    assert got == {(t, m, x) for t, m in report.TOOLS.values() for x in ("default", "none")}
    for row in rows:
        assert 0.0 <= row["Dice organ"] <= 1.0 and row["predict s/case"] > 0 and row["train peak RAM GiB"] > 0
    results = json.loads((work / "peers.json").read_text())
    fold = results["folds"]["holdout"]
    # the same validation cases on both sides: nnU-Net's split file and both tools' predictions
    preprocessed = next((work / "nnUNet_preprocessed").glob("Dataset990_*"))
    splits = json.loads((preprocessed / "splits_final.json").read_text())
    assert fold["val_cases"] == splits[0]["val"][: peers.SMOKE_CASES]
    for name in ("nnunet_mirror", "medseg-mixed_none"):
        masks = sorted(p.name for p in (work / "predictions" / "holdout" / name).glob("*.nii.gz"))
        assert masks == [f"{c}.nii.gz" for c in fold["val_cases"]]
    budget = fold["nnunet"]["train"]
    assert budget["epochs"] == peers.SMOKE_EPOCHS and budget["iterations_per_epoch"] == 2
    assert [r["precision"] for r in results["step_speed"]["rows"]] == ["fp32", "fp32", "mixed"]
    assert results["step_speed"]["rows"][0]["ratio"] == 1.0
