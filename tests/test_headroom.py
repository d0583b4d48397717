"""The advisor's headroom rule through the real Lightning Trainer on CPU: a layer whose FP16 outputs sit close to
65504 (without overflowing) is promoted from PrecisionMonitor's sampled per-layer abs-maxes, its neighbour is not;
nothing happens with the rule off or in BF16; the decision is in the console, the plan and the checkpoint."""

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from medseg.precision import MasterWeightPrecision
from medseg.precision.advisor import PrecisionAdvisor
from medseg.precision.headroom import HeadroomRule
from medseg.precision.monitor import PrecisionMonitor
from medseg.precision.precision_plan import PLAN_FILE, load_plan
from medseg.tracking.summary import plan_table

from .test_advisor import fit, plugin
from .test_plugin import DATA, QUIET, _assert_identical, _state

TARGET = 2.0**15  # the loud layer's largest output: 1 bit below FP16's 65504, 2 bits above the rule's limit


class LoudNet(LightningModule):
    """conv -> loud (1x1 conv, outputs up to ~2^15) -> x 1e-4 -> instance norm -> linear. Nothing overflows."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.loud = nn.Conv3d(4, 4, 1)
        self.norm = nn.InstanceNorm3d(4, affine=True)
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():  # scale the weights so that the loud layer's outputs on the data reach TARGET
            self.loud.bias.zero_()
            self.loud.weight *= TARGET / self.loud(self.conv(DATA.tensors[0])).abs().max()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.norm(self.loud(self.conv(x)) * 1e-4)).mean((2, 3, 4)))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x).float(), y)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-3)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)  # its state is compared too
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def headroom_plugin(dtype: str = "float16", rule: HeadroomRule | None = None) -> MasterWeightPrecision:
    advisor = PrecisionAdvisor(overflows=2, window=10, headroom=rule)
    return plugin(advisor=advisor) if dtype == "float16" else MasterWeightPrecision(dtype, advisor=advisor)


def monitored_fit(model: LightningModule, prec: MasterWeightPrecision, steps: int, root: Path, **kwargs: Any) -> Any:
    callbacks = [PrecisionMonitor(every_n_steps=1), *kwargs.pop("callbacks", [])]
    return fit(model, prec, steps, root, callbacks=callbacks, **kwargs)


def test_layer_close_to_fp16_max_is_promoted_not_its_neighbour(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, prec = LoudNet(), headroom_plugin(rule=HeadroomRule(bits=2.0, samples=3))
    with caplog.at_level("INFO", logger="medseg.precision.plugin"):
        monitored_fit(model, prec, 5, tmp_path)

    # no overflow at all: this is the headroom rule, on the third sampled step in a row below 2 bits
    assert prec.scaler.skipped_steps == 0
    (decision,) = prec.precision_plan.decisions
    assert (decision.layer, decision.step, decision.where, decision.window) == ("loud", 2, "forward output", 3)
    assert 0.0 < decision.headroom_bits < 2.0 and decision.min_bits == 2.0
    assert model.loud.weight.dtype == torch.float32
    assert model.conv.weight.dtype == model.fc.weight.dtype == torch.float16  # the neighbours stay FP16
    (line,) = [r.getMessage() for r in caplog.records if "-> FP32" in r.getMessage()]
    assert line.startswith("precision advisor: step 2: loud -> FP32 (FP16 headroom of its forward output below 2")
    assert "on 3 sampled steps in a row" in line
    assert load_plan(tmp_path / PLAN_FILE) == prec.precision_plan
    assert plan_table(prec.precision_plan).data == [
        ["loud", "advisor", 2, "forward output", 0, 3, 512.0, decision.headroom_bits]  # scale grew twice
    ]
    assert prec.state_dict()["plan"]["decisions"][0]["headroom_bits"] == decision.headroom_bits


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_nothing_is_promoted_with_the_rule_off_or_in_bfloat16(tmp_path: Path, dtype: str) -> None:
    model = LoudNet()
    # BF16: the rule on, firing on the first sample below 2 bits; FP16: the rule off
    prec = headroom_plugin(dtype, HeadroomRule(bits=2.0, samples=1) if dtype == "bfloat16" else None)
    monitored_fit(model, prec, 3, tmp_path)
    assert prec.precision_plan.decisions == [] and prec.scaler.skipped_steps == 0
    assert model.loud.weight.dtype == (torch.float16 if dtype == "float16" else torch.bfloat16)


def test_headroom_counts_resume_bit_identically(tmp_path: Path) -> None:
    """Stopped after four low-headroom samples (one epoch) and resumed, the run promotes at the same step, and ends
    in the same state, as one that was not stopped."""
    model, prec = LoudNet(), headroom_plugin(rule=HeadroomRule(bits=2.0, samples=5))
    straight = _state(monitored_fit(model, prec, 6, tmp_path / "straight"), prec, model)
    straight_plan = prec.precision_plan

    saver = ModelCheckpoint(dirpath=tmp_path, filename="half", every_n_train_steps=4)
    prec = headroom_plugin(rule=HeadroomRule(bits=2.0, samples=5))
    monitored_fit(LoudNet(), prec, 4, tmp_path / "half", barebones=False, callbacks=[saver], **QUIET)
    saved = torch.load(tmp_path / "half.ckpt", weights_only=True)["MasterWeightPrecision"]
    assert saved["advisor"]["headroom"] == {"loud": 4} and saved["plan"]["decisions"] == []
    model, prec = LoudNet(), headroom_plugin(rule=HeadroomRule(bits=2.0, samples=5))
    resumed = _state(monitored_fit(model, prec, 6, tmp_path / "resumed", ckpt_path=tmp_path / "half.ckpt"), prec, model)

    assert [d.step for d in straight_plan.decisions] == [4] and prec.precision_plan == straight_plan
    _assert_identical(straight, resumed)


@pytest.mark.parametrize(
    ("act", "grad", "scale", "promoted"),
    [
        (2.0**15, None, 256.0, True),  # forward output 1 bit below the limit
        (2.0**12, None, 256.0, False),  # 4 bits below
        (1.0, 2.0**15, 64.0, True),  # output gradient 1 bit below at a scale under backward_max_scale
        (1.0, 2.0**15, 2.0**16, False),  # the same at scale 2^16: 10 bits below once brought down to 128
        (1.0, 2.0**14, 256.0, False),  # at scale 256 it counts as 2^13 (at 128): 3 bits below
    ],
)
def test_rule_counts_forward_and_gradient_headroom(
    act: float, grad: float | None, scale: float, promoted: bool
) -> None:
    rule = HeadroomRule(bits=2.0, samples=2)
    grads = {"layer": grad} if grad is not None else {}
    decisions = [rule.observe(step, {"layer": act, "quiet": 1.0}, grads, scale, 128.0, set()) for step in (0, 1)]
    assert decisions[0] == []
    assert [d.layer for d in decisions[1]] == (["layer"] if promoted else [])
    if promoted:
        assert decisions[1][0].where == ("forward output" if grad is None else "output gradient")


def test_a_sample_with_headroom_breaks_the_run_and_skipped_layers_never_count() -> None:
    rule = HeadroomRule(bits=2.0, samples=2)
    assert rule.observe(0, {"a": 2.0**15}, {}, 1.0, 128.0, set()) == []
    assert rule.observe(1, {"a": 1.0}, {}, 1.0, 128.0, set()) == []  # back to plenty: the run starts again
    assert rule.observe(2, {"a": 2.0**15}, {}, 1.0, 128.0, set()) == []
    assert rule.observe(3, {"a": 2.0**15}, {}, 1.0, 128.0, {"a"}) == []  # already FP32
    assert rule.state_dict() == {"a": 1}
    with pytest.raises(ValueError, match="advisor.headroom"):
        HeadroomRule(bits=0.0)
