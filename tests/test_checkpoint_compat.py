"""Checkpoints from earlier medseg versions and from Lightning's own precision plugins.

`tests/data/mixed_precision_key.ckpt` was written by medseg before the plugin was renamed (class `MixedPrecision`,
now `MasterWeightPrecision`), with `python -m medseg.train debug=fast +precision=mixed 'model.net.channels=[4,8]'
'model.net.strides=[2]' model.net.num_res_units=0 trainer.max_epochs=1 test=false`: 2 steps, bf16 weights.
"""

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader

from medseg.precision import MasterWeightPrecision
from medseg.precision.export import fp32_state_dict
from medseg.train import build, build_model

from .test_plugin import DATA, TinyNet, fit

OLD_CKPT = Path(__file__).parent / "data" / "mixed_precision_key.ckpt"
OLD_NET = ["model.net.channels=[4,8]", "model.net.strides=[2]", "model.net.num_res_units=0"]


class MastersAtStart(Callback):
    """The plugin's masters, scaler state and the model's weights right after the checkpoint was restored."""

    def on_train_start(self, trainer, pl_module) -> None:
        plugin = trainer.precision_plugin
        self.masters = [m.detach().clone() for m in plugin.master_params]
        self.scaler = plugin.scaler.state_dict()
        self.weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def test_checkpoint_saved_before_the_rename_resumes_with_its_masters(tiny_cfg, tmp_path):
    old = torch.load(OLD_CKPT, weights_only=True)
    assert "MixedPrecision" in old and "MasterWeightPrecision" not in old  # what this test is about
    cfg = tiny_cfg("+precision=mixed", *OLD_NET, "trainer.max_epochs=2")
    datamodule = build(cfg.data)
    model = build_model(cfg, datamodule)
    seen = MastersAtStart()
    plugin = build(cfg.precision.plugin)
    trainer = Trainer(
        plugins=[plugin], callbacks=[seen], max_steps=old["global_step"] + 1, accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(model, datamodule=datamodule, ckpt_path=OLD_CKPT)

    saved = old["MixedPrecision"]
    assert len(seen.masters) == len(saved["masters"][0])
    for master, expected in zip(seen.masters, saved["masters"][0], strict=True):
        assert torch.equal(master, expected)  # the FP32 masters, not masters remade from the bf16 weights
    assert seen.scaler == saved["scaler"]
    for name, master in zip(saved["names"][0], saved["masters"][0], strict=True):
        assert torch.equal(seen.weights[name], master.to(seen.weights[name].dtype))
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    new = torch.load(tmp_path / "new.ckpt", weights_only=True)
    assert "MasterWeightPrecision" in new and "MixedPrecision" not in new


def test_checkpoint_saved_before_the_rename_exports_its_masters():
    old = torch.load(OLD_CKPT, weights_only=True)
    weights = fp32_state_dict(old)
    for name, master in zip(old["MixedPrecision"]["names"][0], old["MixedPrecision"]["masters"][0], strict=True):
        assert torch.equal(weights[name], master)
        assert not torch.equal(weights[name], old["state_dict"][name].float())  # bf16 rounding differs


def test_lightning_amp_checkpoint_is_refused_by_mixed(tmp_path):
    """Lightning's AMP plugin keeps its GradScaler state under `MixedPrecision`, the key our plugin had."""
    amp = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = Trainer(plugins=[amp], max_steps=2, barebones=True, accelerator="cpu")
    trainer.fit(TinyNet(), DataLoader(DATA, batch_size=2))
    trainer.save_checkpoint(tmp_path / "amp.ckpt")
    assert "masters" not in torch.load(tmp_path / "amp.ckpt", weights_only=True)["MixedPrecision"]
    with pytest.raises(ValueError, match=r"written by Lightning's precision='16-mixed'.*\+precision=amp"):
        fit(TinyNet(), MasterWeightPrecision("float16"), max_steps=3, ckpt_path=tmp_path / "amp.ckpt")
