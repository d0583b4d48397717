"""Real Trainer runs on tiny synthetic data: the CLI in a subprocess, learning, precision modes."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.train import train

from .helpers import TINY, TINY_UNET, on_dataset, output, run_cli


def test_cli_runs_and_writes_checkpoint(tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*on_dataset(tiny_dataset, tmp_path / "cache"), f"hydra.run.dir={run_dir}", "trainer.max_epochs=1"]
    result = run_cli(*TINY, *TINY_UNET, *overrides)
    assert result.returncode == 0, output(result)
    ckpts = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    assert any(c.name == "last.ckpt" for c in ckpts) and len(ckpts) >= 2, ckpts
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert "best checkpoint:" in result.stdout and "mean" in result.stdout
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["label_names"] == ["background", "organ", "tumour"]


@pytest.fixture(scope="module")
def fp32_dice(tiny_dataset, tmp_path_factory):
    """Validation Dice of a short fp32 run; other precision modes are compared to it."""
    return _short_run(tiny_dataset, tmp_path_factory.mktemp("fp32"), [])


def _short_run(dataset, tmp_path, extra):
    from .conftest import compose_cfg

    overrides = [
        *TINY,
        *TINY_UNET,
        f"data.root={dataset}",
        "++data.synthesize=null",
        f"data.cache_dir={tmp_path / 'cache'}",
        "trainer.max_epochs=20",
        "trainer.check_val_every_n_epoch=20",
        "model.optimizer.lr=0.01",
        "model.scheduler.warmup_steps=3",
        "test=false",
        "data.batch_size=2",
        "data.num_samples=2",
        *extra,
    ]
    train(compose_cfg(overrides, tmp_path / "run"))
    metrics = list(csv.DictReader((tmp_path / "run" / "csv" / "metrics.csv").open()))
    last = [row for row in metrics if row["val/dice"]][-1]
    return float(last["val/dice"]), float(last["val/dice/organ"])


def test_short_training_learns(fp32_dice):
    """60 steps on 6 tiny volumes: the organ is learnt (an untrained net scores ~0.1-0.2 on it; the small
    tumour takes a few hundred steps and is not asked for here)."""
    dice, organ = fp32_dice
    assert organ > 0.8 and dice > 0.4, fp32_dice


def test_mixed_matches_fp32(fp32_dice, tiny_dataset, tmp_path):
    """+precision=mixed (bf16 weights on CPU, FP32 masters) ends within 0.02 Dice of fp32, same seed and steps."""
    mixed = _short_run(tiny_dataset, tmp_path, ["+precision=mixed"])
    assert abs(mixed[0] - fp32_dice[0]) < 0.02 and abs(mixed[1] - fp32_dice[1]) < 0.02, (mixed, fp32_dice)


def _last_checkpoint(tiny_cfg, *extra: str, run: str = "run") -> dict:
    cfg = tiny_cfg("+precision=mixed", "trainer.max_epochs=1", "test=false", *extra)
    # one folder per run: a run dir holding last.ckpt is resumed from it (requeued jobs)
    cfg.paths.output_dir = str(Path(cfg.paths.output_dir).with_name(run))
    train(cfg)
    return torch.load(f"{cfg.paths.output_dir}/checkpoints/last.ckpt", weights_only=True)


def test_channels_last_model(tiny_cfg):
    """`model.channels_last=true`: conv weights and their FP32 masters are NDHWC; names as in a plain run."""
    state = _last_checkpoint(tiny_cfg, "model.channels_last=true")
    conv = {k: v for k, v in state["state_dict"].items() if v.ndim == 5}
    assert conv and all(v.is_contiguous(memory_format=torch.channels_last_3d) for v in conv.values())
    assert any(not v.is_contiguous() for v in conv.values())  # really another layout (1x1x1 kernels are both)
    masters = [m for m in state["MasterWeightPrecision"]["masters"][0] if m.ndim == 5]
    assert masters and all(m.is_contiguous(memory_format=torch.channels_last_3d) for m in masters)
    assert all(n.startswith("net.") and "_orig_mod" not in n for n in state["state_dict"])


@pytest.mark.slow
def test_compiled_model(tiny_cfg):
    """`model.compile=true` trains through torch.compile and keeps the checkpoint's parameter names."""
    from torch._dynamo.utils import counters

    plain = _last_checkpoint(tiny_cfg, "model.channels_last=false")
    counters.clear()
    with pytest.warns(Warning, match="per-layer stats are off"):  # their hooks would force recompiles
        compiled = _last_checkpoint(tiny_cfg, "model.channels_last=false", "model.compile=true", run="compiled")
    assert counters["stats"]["unique_graphs"] > 0  # dynamo really traced the net
    assert not counters["unimplemented"]  # and never gave up on it (recompile limit, unsupported code)
    assert list(compiled["state_dict"]) == list(plain["state_dict"])
    assert compiled["global_step"] == plain["global_step"] > 0
    # same seed, data and steps: compiled kernels may round differently, but the weights must stay close
    for name, value in plain["state_dict"].items():
        torch.testing.assert_close(compiled["state_dict"][name].float(), value.float(), atol=0.05, rtol=0.05)


def test_train_false_tests_a_checkpoint(tiny_cfg):
    """`train=false ckpt_path=...`: no fitting, the checkpoint tested on the validation split (here mirrored)."""
    from medseg.config_check import ConfigError

    state = _last_checkpoint(tiny_cfg)
    with pytest.raises(ConfigError, match="ckpt_path"):
        train(tiny_cfg("train=false"))
    run = Path(tiny_cfg().paths.output_dir).with_name("run")
    [validated] = [float(r["val/dice"]) for r in csv.DictReader(open(run / "csv" / "metrics.csv")) if r.get("val/dice")]
    assert validated > 0.01  # the net predicts something, so a wrong checkpoint or split shows in the Dice

    def test_dice(*extra: str, name: str) -> float:
        cfg = tiny_cfg("+precision=mixed", "train=false", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", *extra)
        cfg.paths.output_dir += name
        train(cfg)
        metrics = list(csv.DictReader(open(f"{cfg.paths.output_dir}/csv/metrics.csv")))
        assert not any(row.get("train/loss") for row in metrics)  # nothing was trained
        [tested] = [row for row in metrics if row.get("test/dice")]
        per_class = [float(v) for k, v in tested.items() if k.startswith("test/dice/") and v]
        assert len(per_class) == 2 and float(tested["test/dice"]) == pytest.approx(np.mean(per_class), abs=1e-6)
        return float(tested["test/dice"])

    # last.ckpt was saved after the epoch's validation round: unmirrored, the test pass scores that round again
    assert test_dice("model.test_mirror_axes=[]", name="_test") == pytest.approx(validated, abs=1e-5)
    mirrored = test_dice("model.test_mirror_axes=[0,1,2]", name="_mirrored")
    assert mirrored != validated and abs(mirrored - validated) < 0.1  # 8 flipped passes averaged: close, not equal
    assert state["global_step"] > 0


def test_checkpoint_with_mirror_axes_loads_weights_only(tiny_cfg):
    """Hydra hands lists over as ListConfig; the hyper-parameters must still load with weights_only=True."""
    state = _last_checkpoint(tiny_cfg, "model.test_mirror_axes=[0,2]")
    assert state["hyper_parameters"]["test_mirror_axes"] == [0, 2]
