"""Every option of every config group composes with the real conf/ and instantiates."""

import lightning.pytorch as pl
import pytest
from hydra.utils import instantiate

from medseg import CONF_DIR
from medseg.train import build_model, instantiate_each, precision_kwargs

from .conftest import shared_dataset

GROUPS = {p.name: sorted(f.stem for f in p.glob("*.yaml")) for p in CONF_DIR.iterdir() if p.is_dir()}
REAL_DATA = {"hippocampus": "Task04_Hippocampus", "brats": "BraTS2018_WT_2mm"}


def options(group: str) -> list[str]:
    return GROUPS.get(group, [])


@pytest.mark.parametrize("option", options("model"))
def test_model_options_build(option, tiny_cfg):
    cfg = tiny_cfg(f"model={option}", "data.patch_size=[32,32,32]")
    datamodule = instantiate(cfg.data)
    model = build_model(cfg, datamodule)
    assert isinstance(model, pl.LightningModule)
    assert model.hparams.inference["net"]["in_channels"] == 1
    assert model.hparams.inference["net"]["out_channels"] == 3  # background, organ, tumour


@pytest.mark.parametrize("option", options("data"))
def test_data_options_instantiate(option, tiny_cfg, tiny_dataset):
    if option in REAL_DATA:
        root = shared_dataset(REAL_DATA[option])
    else:
        root = tiny_dataset
    cfg = tiny_cfg(f"data={option}", f"data.root={root}")
    datamodule = instantiate(cfg.data)
    assert datamodule.in_channels >= 1 and datamodule.num_classes >= 2


@pytest.mark.parametrize("group", ["trainer", "callbacks", "logger", "precision"])
def test_runtime_groups_instantiate(group, tiny_cfg):
    for option in options(group):
        cfg = tiny_cfg(f"+{group}={option}" if group == "precision" else f"{group}={option}", "trainer.accelerator=cpu")
        callbacks, loggers = instantiate_each(cfg.get("callbacks")), instantiate_each(cfg.get("logger"))
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **precision_kwargs(cfg))
        assert isinstance(trainer, pl.Trainer), option


@pytest.mark.parametrize("option", options("experiment"))
def test_experiments_compose(option, tiny_cfg):
    cfg = tiny_cfg(f"experiment={option}")
    assert cfg.model.net and cfg.data.patch_size


@pytest.mark.parametrize("option", options("debug"))
def test_debug_options_compose(option, tiny_cfg):
    assert tiny_cfg(f"debug={option}").trainer.max_epochs >= 1


def test_precision_is_not_in_defaults(tiny_cfg):
    """`+precision=<name>` only works while precision is absent from the defaults list."""
    assert "precision" not in tiny_cfg()
    assert tiny_cfg("+precision=amp").precision.name == "amp"
