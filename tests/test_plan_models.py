"""`plan=auto` on a user's folder with the model the user chose (`model=swinunetr|unetr|segresnet|unet`), and a
command-line `trainer.max_epochs` on a planned run (issue 22, part 5)."""

from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import open_dict

from medseg.config_check import check_config
from medseg.planning.auto import plan_dataset
from medseg.planning.plan_file import plan_yaml, validation_interval
from medseg.train import train

from .helpers import TINY
from .test_plan import _planned, write_msd

MODELS = ["swinunetr", "unetr", "segresnet", "unet"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """6 cases of 64-70 x 64 x 40 voxels at 1.5 mm: DynUNet's rules plan a patch whose 40-voxel axis no
    transformer U-Net takes (SwinUNETR: multiples of 32, UNETR: of 16)."""
    shapes = [(64 + i, 64, 40) for i in range(6)]
    return write_msd(tmp_path_factory.mktemp("models") / "Task_m", shapes, [(1.5, 1.5, 1.5)] * 6)


@pytest.mark.parametrize("model", MODELS)
def test_plan_auto_plans_for_the_chosen_model(model, folder, tmp_path):
    overrides = ["data=msd", f"data.root={folder}", f"model={model}", "planner.measure=false", "planner.memory=1G"]
    _, cfg = _planned([*overrides, "+precision=mixed"], tmp_path)
    check_config(cfg)  # before the fix: "data.patch_size: [64, 64, 40] cannot go through SwinUNETR ..."
    saved = yaml.safe_load((tmp_path / "training_plan.yaml").read_text())
    assert f"override /model: {model}" in (tmp_path / "training_plan.yaml").read_text()
    assert "filters" not in cfg.model.net or cfg.model.net.filters is None  # the chosen net keeps its widths
    patch = list(cfg.data.patch_size)
    assert patch == saved["data"]["patch_size"] and max(patch) <= 70
    # the planned net takes the patch: one training step's forward at batch 2 gives class logits of that shape
    with open_dict(cfg):
        cfg.model.net.in_channels, cfg.model.net.out_channels = 1, 3
    net = instantiate(cfg.model.net).train()
    out = net(torch.randn(2, 1, *patch))
    assert out.shape == (2, 3, *patch), (model, patch)
    # the plan's memory is the chosen net's, counted again from scratch; inside the budget
    from medseg.planning.memory import step_cost
    from medseg.planning.nets import PlannedNet

    chosen = PlannedNet(model, dict(cfg.model.net))
    cost = step_cost(1, 3, patch, list(cfg.data.spacing), [], torch.bfloat16, net=chosen)
    assert cost.bytes(cfg.data.batch_size) <= 2**30
    dynunet = plan_dataset(folder, "mixed", memory="1G", measure=False)
    assert cost.bytes(saved["data"]["batch_size"]) != dynunet.memory  # not the DynUNet's count


def test_swinunetr_on_images_too_small_is_one_line(tmp_path):
    """No patch of multiples of 32 with two bottleneck voxels fits 40^3 images: say so, naming the model."""
    from medseg.config_check import ConfigError

    root = write_msd(tmp_path / "Task_s", [(40, 40, 40)] * 4, [(1.0, 1.0, 1.0)] * 4)
    base = ["data=msd", f"data.root={root}", "model=swinunetr", "planner.measure=false"]
    with pytest.raises(ConfigError, match=r"^plan: images of .* too small for model=swinunetr .*data.spacing") as e:
        _planned(base, tmp_path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("epochs", "planned", "expected"), [(2, 18, 1), (3, 18, 1), (6, 18, 3), (7, 18, 1), (40, 18, 10), (72, 18, 18)]
)
def test_validation_interval_keeps_two_rounds_and_the_last_epoch(epochs, planned, expected):
    every = validation_interval(epochs, planned)
    assert every == expected and epochs % every == 0 and epochs // every >= 2 and every <= planned


@pytest.fixture(scope="module")
def long_plan(tiny_dataset, tmp_path_factory) -> Path:
    """A plan for the tiny folder that validates every 18th of 36 epochs (as a measured 30-minute plan may)."""
    plan = plan_dataset(tiny_dataset, "fp32", time="30m", memory="150M", measure=False)
    plan.epochs, plan.val_every = 36, 18
    path = tmp_path_factory.mktemp("longplan") / "plan.yaml"
    path.write_text(plan_yaml(plan))
    return path


def test_command_line_max_epochs_keeps_two_validation_rounds(long_plan, tmp_path):
    _, cfg = _planned([f"plan={long_plan}"], tmp_path / "a")
    assert cfg.trainer.max_epochs == 36 and cfg.trainer.check_val_every_n_epoch == 18
    _, cfg = _planned([f"plan={long_plan}", "trainer.max_epochs=2"], tmp_path / "b")
    assert cfg.trainer.max_epochs == 2 and cfg.trainer.check_val_every_n_epoch == 1
    _, cfg = _planned([f"plan={long_plan}", "trainer.max_epochs=6", "trainer.check_val_every_n_epoch=4"], tmp_path)
    assert cfg.trainer.check_val_every_n_epoch == 4  # given on the command line: kept as given


def test_two_epoch_planned_run_validates_and_saves_a_best_checkpoint(long_plan, tmp_path):
    """A real 2-epoch Lightning run from the 18-epoch-interval plan: validated, so a best checkpoint exists."""
    tiny = [o for o in TINY if not o.startswith(("trainer.max_epochs", "trainer.check_val", "data.patch_size"))]
    overrides = [f"plan={long_plan}", *tiny, "trainer.max_epochs=2", "test=false", "+trainer.limit_train_batches=1"]
    overrides += [f"paths.log_dir={tmp_path / 'logs'}", f"data.cache_dir={tmp_path / 'cache'}"]
    _, cfg = _planned(overrides, tmp_path / "run")
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    train(cfg)
    best = sorted((tmp_path / "run" / "checkpoints").glob("epoch*-dice*.ckpt"))  # ModelCheckpoint on val/dice
    assert best, sorted(p.name for p in (tmp_path / "run").rglob("*"))


def test_plan_command_plans_for_a_model(folder, tmp_path):
    from medseg.plan import main as plan_main

    out = plan_main([str(folder), "--no-measure", "--model", "swinunetr", "--out", str(tmp_path / "p.yaml")])
    text = out.read_text()
    assert "override /model: swinunetr" in text and "filters" not in text
    assert all(p % 32 == 0 for p in yaml.safe_load(text)["data"]["patch_size"])
