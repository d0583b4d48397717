"""Every option of every config group composes with the real conf/, instantiates, and does what it says."""

import pytest
import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from medseg import CONF_DIR
from medseg.train import build_model, instantiate_each, precision_kwargs

from .conftest import compose_cfg, shared_dataset

GROUPS = {p.name: sorted(f.stem for f in p.glob("*.yaml")) for p in CONF_DIR.iterdir() if p.is_dir()}
REAL_DATA = {"hippocampus": "Task04_Hippocampus", "brats": "BraTS2018_WT_2mm"}


def options(group: str) -> list[str]:
    return GROUPS.get(group, [])


@pytest.mark.parametrize("option", options("model"))
def test_model_options_build(option, tiny_cfg):
    cfg = tiny_cfg(f"model={option}", "data.patch_size=[32,32,32]")
    datamodule = instantiate(cfg.data)
    model = build_model(cfg, datamodule).eval()
    assert model.hparams.inference["net"]["in_channels"] == 1
    assert model.hparams.inference["net"]["out_channels"] == 3  # background, organ, tumour
    with torch.no_grad():
        logits = model(torch.zeros(1, 1, 32, 32, 32))
    assert logits.shape == (1, 3, 32, 32, 32)  # channels from the data reach the net


@pytest.mark.parametrize("option", options("data"))
def test_data_options_instantiate(option, tiny_cfg, tiny_dataset):
    root = shared_dataset(REAL_DATA[option]) if option in REAL_DATA else tiny_dataset
    cfg = tiny_cfg(f"data={option}", f"data.root={root}")
    datamodule = instantiate(cfg.data)
    assert datamodule.in_channels >= 1 and datamodule.num_classes >= 2


def _trainer(cfg):
    callbacks, loggers = instantiate_each(cfg.get("callbacks")), instantiate_each(cfg.get("logger"))
    return instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, **precision_kwargs(cfg.get("precision"))
    )


@pytest.mark.parametrize("option", options("precision"))
def test_precision_options_reach_the_trainer(option, tiny_cfg):
    cfg = tiny_cfg(f"+precision={option}")
    trainer = _trainer(cfg)
    if cfg.precision.get("plugin") is not None:
        assert type(trainer.precision_plugin) is get_class(cfg.precision.plugin._target_)
        expected_dtype = {"mixed": None, "mixed_bf16": torch.bfloat16}[option]  # auto resolves at fit time
        assert trainer.precision_plugin.dtype == expected_dtype
    else:
        # on CPU Lightning runs "16-mixed" as bf16 autocast and says so in trainer.precision
        assert trainer.precision == {"16-mixed": "bf16-mixed"}.get(cfg.precision.lightning, cfg.precision.lightning)


@pytest.mark.parametrize("option", options("callbacks"))
def test_callback_options_reach_the_trainer(option, tiny_cfg):
    cfg = tiny_cfg(f"callbacks={option}")
    wanted = {get_class(c._target_) for c in (cfg.callbacks or {}).values() if c is not None}
    have = {type(c) for c in _trainer(cfg).callbacks}
    assert wanted <= have, wanted - have


@pytest.mark.parametrize("option", options("logger"))
def test_logger_options_reach_the_trainer(option, tiny_cfg):
    cfg = tiny_cfg(f"logger={option}")
    wanted = [get_class(c._target_) for c in (cfg.logger or {}).values() if c is not None]
    assert [type(lg) for lg in _trainer(cfg).loggers] == wanted


@pytest.mark.parametrize("option", options("trainer"))
def test_trainer_options_instantiate(option, tiny_cfg):
    cfg = tiny_cfg(f"trainer={option}", "trainer.accelerator=cpu", "trainer.max_epochs=3")
    trainer = _trainer(cfg)
    assert trainer.max_epochs == 3 and trainer.check_val_every_n_epoch == cfg.trainer.check_val_every_n_epoch
    if option == "ddp":
        assert type(trainer.strategy).__name__ == "DDPStrategy"


def _leaves(node, prefix=""):
    """(dotted key, value) of every leaf of a plain nested dict."""
    for key, value in node.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in ("experiment", "debug") for o in options(g)])
def test_global_presets_set_their_keys(group, option, tmp_path):
    """Every key an experiment/debug file sets lands in the composed config (nothing later in the defaults list
    overrides it), and the groups it overrides are switched."""
    preset = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{option}.yaml"))
    defaults = preset.pop("defaults", [])
    cfg = compose_cfg([f"{group}={option}"], tmp_path)
    composed = OmegaConf.to_container(cfg)  # unresolved: interpolations compare as written
    for key, value in _leaves(preset):
        node = composed
        for part in key.split("."):
            node = node[part]
        assert node == value, key
    for entry in defaults:
        if isinstance(entry, dict):
            ((target, choice),) = entry.items()
            group_name = target.removeprefix("override /")
            chosen = OmegaConf.load(CONF_DIR / group_name / f"{choice}.yaml")
            if "_target_" in chosen:
                assert cfg[group_name]._target_ == chosen._target_, entry


def test_precision_is_not_in_defaults(tiny_cfg):
    """`+precision=<name>` only works while precision is absent from the defaults list."""
    assert "precision" not in tiny_cfg()
    assert tiny_cfg("+precision=amp").precision.name == "amp"
