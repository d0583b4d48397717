"""One rule for "the run's best checkpoint" (medseg.checkpoint.best_checkpoint), used by predict, report and the
benchmarks, on a real run that wrote every kind of checkpoint: the scored best, last.ckpt, recovery.ckpt,
interrupted.ckpt and hpc_ckpt_<n>.ckpt."""

import shutil

import pytest
import torch

from medseg.checkpoint import CheckpointError, best_checkpoint
from medseg.predict import Predictor, predict
from medseg.train import train

from .test_predict import _odd_input, predict_cfg
from .test_resume_exact import _cfg


@pytest.fixture(scope="module")
def run_dir(tiny_dataset, tmp_path_factory):
    """3 epochs with a recovery checkpoint every 2 steps, stopped at step 7 as Ctrl-C stops it (interrupted.ckpt,
    which Lightning deletes once a resumed run ends), and a SLURM requeue checkpoint where Lightning puts it."""
    tmp = tmp_path_factory.mktemp("best")
    run = tmp / "run"
    stop = ["+callbacks.stop._target_=tests.test_resume_exact.StopAt", "+callbacks.stop.step=7"]
    with pytest.raises(SystemExit):
        train(
            _cfg(
                tiny_dataset, tmp / "cache", run, "mixed", "callbacks.recovery_checkpoint.every_n_train_steps=2", *stop
            )
        )
    shutil.copy(run / "checkpoints" / "recovery.ckpt", run / "hpc_ckpt_1.ckpt")
    names = {p.name for p in (run / "checkpoints").glob("*.ckpt")}
    assert {"last.ckpt", "recovery.ckpt", "interrupted.ckpt"} < names and len(names) == 4, names
    return run


def test_best_is_what_model_checkpoint_recorded(run_dir):
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    [recorded] = [v["best_model_path"] for k, v in last["callbacks"].items() if "val/dice" in k]
    assert best_checkpoint(run_dir).name == recorded.split("/")[-1]
    assert best_checkpoint(run_dir).name.startswith("epoch")


def test_predict_takes_a_run_dir_and_fold_runs(run_dir, tmp_path):
    _odd_input(tmp_path / "in")
    [written] = predict(predict_cfg(run_dir, tmp_path / "in", tmp_path / "out"))
    assert written.is_file()

    folds = tmp_path / "multirun"  # a multirun folder of two fold runs: the best checkpoint of each
    shutil.copytree(run_dir, folds / "0")
    shutil.copytree(run_dir, folds / "1")
    best = best_checkpoint(run_dir).name
    assert Predictor(str(folds), "cpu").paths == [
        folds / "0" / "checkpoints" / best,
        folds / "1" / "checkpoints" / best,
    ]


def test_highest_dice_wins_and_resume_points_never_do(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    for name in ("recovery.ckpt", "interrupted.ckpt"):
        (folder / name).write_bytes(b"")
    with pytest.raises(
        CheckpointError, match=r"no best checkpoint .* nor last\.ckpt \(holds interrupted\.ckpt, recovery"
    ):
        best_checkpoint(tmp_path / "run")
    (folder / "last.ckpt").write_bytes(b"")
    assert best_checkpoint(tmp_path / "run") == folder / "last.ckpt"
    for name in (
        "epoch003-dice0.7100.ckpt",
        "epoch010-dice0.8200.ckpt",
        "epoch012-dice0.8200.ckpt",
        "epoch008-dice0.8000.ckpt",
    ):
        (folder / name).write_bytes(b"")
    assert best_checkpoint(tmp_path / "run") == folder / "epoch012-dice0.8200.ckpt"
