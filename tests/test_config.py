"""Every option of every config group composes with the real conf/, instantiates, and does what it says."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
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
    # SwinUNETR needs multiples of 32 and > 1 voxel at the bottleneck; the tiny images are smaller than 64, so only
    # the forward below takes that size (the net does not fix its input size; UNETR's img_size is the patch)
    size = 64 if option == "swinunetr" else 32
    cfg = tiny_cfg(f"model={option}", "data.patch_size=[32,32,32]")
    datamodule = instantiate(cfg.data)
    model = build_model(cfg, datamodule).eval()
    assert model.hparams.inference["net"]["in_channels"] == 1
    assert model.hparams.inference["net"]["out_channels"] == 3  # background, organ, tumour
    with torch.no_grad():
        logits = model(torch.zeros(1, 1, size, 32, 32))
    assert logits.shape == (1, 3, size, 32, 32)  # channels from the data reach the net


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


# conf/ restates the defaults of medseg's own classes, so every option shows up in the config and can be overridden
# without a `+`. These are the values that differ from the code on purpose; any other value must equal the
# constructor's default, so the two cannot drift apart unnoticed. (Values for library classes, such as the
# Lightning Trainer or MONAI nets, are medseg's choices and pin the library's behaviour; they are not checked.)
DELIBERATE = {
    "model/unet.yaml:channels_last": "auto: NDHWC on CPU, measured faster there (benchmarks/RESULTS.md)",
    "model/dynunet.yaml:channels_last": "auto: NDHWC on CPU, measured faster there (benchmarks/RESULTS.md)",
    "model/unet.yaml:scheduler.warmup_steps": "a short warm-up for AdamW",
    "model/segresnet.yaml:scheduler.warmup_steps": "a short warm-up for AdamW",
    "model/unetr.yaml:scheduler.warmup_steps": "a short warm-up for AdamW",
    "model/swinunetr.yaml:scheduler.warmup_steps": "a short warm-up for AdamW",
    "model/dynunet.yaml:scheduler.warmup_steps": "nnU-Net-style SGD: a longer warm-up",
    "model/dynunet.yaml:scheduler.kind": "nnU-Net's poly schedule",
    "model_base/segmentation.yaml:scheduler.warmup_steps": "a short warm-up for AdamW",
    "logger/wandb.yaml:wandb.project": "every run lands in the 'medseg' W&B project",
    "logger/wandb.yaml:wandb.offline": "offline by default: no account, no network",
}


def _medseg_targets(node, key=""):
    """(dotted key, node) of every `_target_: medseg...` node in a plain nested dict."""
    if isinstance(node, dict):
        if str(node.get("_target_", "")).startswith("medseg."):
            yield key, node
        for k, v in node.items():
            yield from _medseg_targets(v, f"{key}.{k}".lstrip("."))


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _as_composed(path):
    """A config file as Hydra composes it: a model file is its base (conf/model_base/) with the file's keys over it."""
    if path.parent != CONF_DIR / "model":
        return OmegaConf.load(path)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=f"model/{path.stem}").model


def _restated_values():
    import inspect

    from hydra.utils import get_method

    for path in sorted(CONF_DIR.rglob("*.yaml")):
        for key, node in _medseg_targets(OmegaConf.to_container(_as_composed(path))):
            params = inspect.signature(get_method(node["_target_"])).parameters
            for name, value in node.items():
                param = params.get(name)
                if param is None or param.default is inspect.Parameter.empty:
                    continue  # `_target_`, required arguments, **kwargs passed on
                if isinstance(value, dict) or (isinstance(value, str) and "${" in value):
                    continue  # a nested object or an interpolation: set from elsewhere
                where = f"{path.relative_to(CONF_DIR)}:{key + '.' if key else ''}{name}"
                yield where, _plain(value), _plain(param.default)


def test_conf_restates_medseg_defaults_exactly():
    values = list(_restated_values())
    assert len(values) > 30  # the walk reaches data, model, callbacks and precision
    drifted = [f"{w}: {v!r} in conf, {d!r} in code" for w, v, d in values if v != d and w not in DELIBERATE]
    assert not drifted, "conf/ and the code disagree (align them, or add the key to DELIBERATE with why):\n" + (
        "\n".join(drifted)
    )
    stale = set(DELIBERATE) - {w for w, v, d in values if v != d}
    assert not stale, f"DELIBERATE lists keys that now equal the code's default or are gone: {stale}"


def test_conf_restates_the_default_time_budget(tiny_cfg):
    from medseg.planning.auto import TIME_BUDGET

    assert tiny_cfg().planner.time == TIME_BUDGET == OmegaConf.load(CONF_DIR / "train.yaml").planner.time
