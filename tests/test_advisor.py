"""The precision plan and advisor through the real Lightning Trainer on CPU: the culprit of an FP16 overflow is
named and kept in FP32, promotion leaves masters and optimizer state exact, the plan survives checkpoints and
files, and bad plans fail in one line."""

import copy
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from medseg.precision import DynamicLossScaler, MasterWeightPrecision
from medseg.precision.advisor import PrecisionAdvisor
from medseg.precision.precision_plan import PLAN_FILE, PrecisionPlanError, load_plan
from medseg.report import plan_section
from medseg.tracking.runs import RunLog
from medseg.tracking.summary import plan_table

from .test_plugin import DATA, QUIET, _assert_identical, _state


class Hot(nn.Module):
    """Squares its input times a large gain: about 25 in FP32, past FP16's 65504 before the 1e-4 rescale."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor([1000.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.gain).square() * 1e-4


class HotNet(LightningModule):
    """conv -> hot -> instance norm -> linear: only ``hot`` overflows in FP16; its neighbours pass inf/NaN on."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.hot = Hot()
        self.norm = nn.InstanceNorm3d(4, affine=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.norm(self.hot(self.conv(x)))).mean((2, 3, 4)))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x).float(), y)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def plugin(**kwargs: Any) -> MasterWeightPrecision:
    kwargs.setdefault("advisor", PrecisionAdvisor(overflows=2, window=10))
    return MasterWeightPrecision("float16", scaler=DynamicLossScaler(init_scale=2.0**8, growth_interval=2), **kwargs)


def fit(model: LightningModule, prec: MasterWeightPrecision, steps: int, root: Path, **kwargs: Any) -> Trainer:
    ckpt_path = kwargs.pop("ckpt_path", None)
    kwargs = {"barebones": True, "accelerator": "cpu", "devices": 1, "default_root_dir": root} | kwargs
    trainer = Trainer(plugins=[prec], max_steps=steps, **kwargs)
    trainer.fit(model, DataLoader(DATA, batch_size=2), ckpt_path=ckpt_path)
    return trainer


def test_culprit_is_named_and_kept_in_fp32(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model, prec = HotNet(), plugin()
    with caplog.at_level("INFO", logger="medseg.precision.plugin"):
        fit(model, prec, 6, tmp_path)

    # every overflow named the layer that made the inf (not the norm after it, which turned it into NaN)
    named = [r.getMessage() for r in caplog.records if "overflowed" in r.getMessage()]
    assert len(named) == 2 and all("forward output in hot" in line for line in named), named
    (decision,) = prec.precision_plan.decisions
    assert (decision.layer, decision.step, decision.where, decision.overflows) == ("hot", 1, "forward output", 2)
    assert any("hot -> FP32" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    # then it trains: no more skipped steps, hot in FP32, the rest still FP16
    assert prec.scaler.skipped_steps == 2 and prec.last_step["overflow"] == 0
    assert model.hot.gain.dtype == torch.float32 and model.conv.weight.dtype == torch.float16
    assert torch.equal(model.hot.gain, prec.master_params[2])  # the weight is its master, exactly
    assert load_plan(tmp_path / PLAN_FILE) == prec.precision_plan  # written where the run lives
    # and shown: medseg.report's plan section, the W&B table
    run = RunLog(path=tmp_path, config={}, series={}, source="csv")
    assert "  - step 1: hot -> FP32 (2 overflows started in it within 10 steps, first non-finite value in its" in (
        plan_section([run])
    )
    assert plan_table(prec.precision_plan).data == [
        ["hot", "advisor", 1, "forward output", 2, 10, 128.0, None]
    ]  # after one halving


def test_promotion_keeps_masters_and_optimizer_state_exact(tmp_path: Path) -> None:
    class PromoteAt(Callback):
        def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, i: int) -> None:
            if trainer.global_step == 3:
                self.masters = list(prec.master_params)
                self.values = [m.detach().clone() for m in self.masters]
                self.optim = copy.deepcopy(trainer.optimizers[0].state_dict())
                prec.promote(pl_module, ["conv"])
                self.after_masters = list(prec.master_params)
                self.after_values = [m.detach().clone() for m in self.after_masters]
                self.after_optim = copy.deepcopy(trainer.optimizers[0].state_dict())
                self.weight = pl_module.conv.weight.detach().clone()

    model, prec, probe = HotNet(), plugin(advisor=None, fp32_modules=["hot"]), PromoteAt()
    fit(model, prec, 6, tmp_path, callbacks=[probe])
    assert all(a is b for a, b in zip(probe.masters, probe.after_masters, strict=True))
    _assert_identical(probe.values, probe.after_values)
    _assert_identical(probe.optim, probe.after_optim)
    assert probe.weight.dtype == torch.float32 and torch.equal(probe.weight, probe.values[0])
    # training went on: the conv stays FP32 and equals its master after every step
    assert prec.scaler.skipped_steps == 0 and model.conv.weight.dtype == torch.float32
    assert torch.equal(model.conv.weight, prec.master_params[0]) and model.fc.weight.dtype == torch.float16


def test_plan_resumes_bit_identically_and_starts_a_new_run(tmp_path: Path, caplog) -> None:
    steps = 8  # promotion at step 1, checkpoint at step 4
    model, prec = HotNet(), plugin()
    straight = _state(fit(model, prec, steps, tmp_path / "straight"), prec, model) | {
        "plan": prec.precision_plan.to_dict()
    }

    model, prec = HotNet(), plugin()
    saver = ModelCheckpoint(dirpath=tmp_path, filename="half", every_n_train_steps=steps // 2)
    fit(model, prec, steps // 2, tmp_path / "half", barebones=False, callbacks=[saver], **QUIET)
    model, prec = HotNet(), plugin()
    resumed_trainer = fit(model, prec, steps, tmp_path / "resumed", ckpt_path=tmp_path / "half.ckpt")
    resumed = _state(resumed_trainer, prec, model) | {"plan": prec.precision_plan.to_dict()}
    assert straight["plan"]["fp32_modules"] == ["hot"] and straight["scaler"]["overflows"] == 2
    _assert_identical(straight, resumed)

    # a new run started from the plan file: hot is FP32 from the first step, nothing overflows
    model, prec = HotNet(), plugin(precision_plan=str(tmp_path / "straight" / PLAN_FILE))
    fit(model, prec, 4, tmp_path / "from_plan")
    assert model.hot.gain.dtype == torch.float32 and prec.scaler.skipped_steps == 0
    assert prec.precision_plan.fp32_modules == ["hot"] and prec.precision_plan.decisions == []
    # the option's old name (`precision.plugin.plan`) still works for one release, with a deprecation warning
    with caplog.at_level(logging.WARNING):
        old = plugin(plan=str(tmp_path / "straight" / PLAN_FILE))
    assert old.precision_plan.fp32_modules == ["hot"] and "precision.plugin.plan is deprecated" in caplog.text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "cannot read it"),
        ("fp32_modules: [net.a", "not valid YAML"),
        ("layers: [hot]", "expected a mapping with fp32_modules and decisions, got ['layers']"),
        ("fp32_modules: hot", "fp32_modules must be a list"),
        ("fp32_modules: [hot]\ndecisions: [{layer: hot}]", "each decision needs the keys"),
    ],
)
def test_bad_plan_files_fail_in_one_line(tmp_path: Path, text: str | None, message: str) -> None:
    path = tmp_path / PLAN_FILE
    if text is not None:
        path.write_text(text)
    with pytest.raises(PrecisionPlanError, match=r"^precision plan .*precision_plan.yaml: ") as err:
        plugin(precision_plan=str(path))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_patterns_that_match_nothing_fail_naming_them(tmp_path: Path) -> None:
    with pytest.raises(PrecisionPlanError) as err:
        fit(HotNet(), plugin(fp32_modules=["hot", "net.blocks.*.attn", "SABlock"]), 1, tmp_path)
    line = str(err.value)
    assert "\n" not in line and "['net.blocks.*.attn', 'SABlock']" in line and "precision.plugin.fp32_modules" in line
    # class names and globs that do match
    model = HotNet()
    fit(model, plugin(fp32_modules=["Hot", "n*m"]), 1, tmp_path)
    assert model.hot.gain.dtype == model.norm.weight.dtype == torch.float32 and model.fc.weight.dtype == torch.float16
    saved = yaml.safe_load((tmp_path / PLAN_FILE).read_text())
    assert saved == {"fp32_modules": ["Hot", "n*m"], "decisions": []}


def test_bfloat16_never_promotes_where_only_fp16_overflows(tmp_path: Path) -> None:
    model = HotNet()
    prec = MasterWeightPrecision("bfloat16", advisor=PrecisionAdvisor(overflows=1))
    fit(model, prec, 3, tmp_path)
    assert prec.scaler.skipped_steps == 0 and prec.precision_plan.decisions == []
    assert model.hot.gain.dtype == torch.bfloat16


@pytest.mark.parametrize(("lr", "low", "high"), [(1e-7, 0.99, 1.0), (1.0, 0.0, 0.25)])
def test_bfloat16_reports_lost_updates_per_layer(tmp_path: Path, lr: float, low: float, high: float) -> None:
    class Plain(HotNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(F.relu(self.norm(self.conv(x))).mean((2, 3, 4)))

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=lr)

    advisor = PrecisionAdvisor(lost_update_every=2)
    fit(Plain(), MasterWeightPrecision("bfloat16", advisor=advisor), 4, tmp_path)
    # BF16 keeps 8 bits: an SGD update of 1e-7 x grad on weights ~0.1 is always lost; at lr 1 most updates show
    assert set(advisor.lost_updates) == {"conv", "fc"}  # low-precision layers only (the norm is FP32)
    assert all(low <= share <= high for share in advisor.lost_updates.values()), advisor.lost_updates


def test_scale_backoff_is_located_but_promotes_nothing(tiny_cfg, caplog: pytest.LogCaptureFixture) -> None:
    """The real CLI config on a MONAI UNet in FP16: a 2^24 loss scale overflows the first steps' gradients; each
    overflow is traced to a module, and none counts (backward, scale > 128), so nothing is promoted."""
    from medseg.train import train

    cfg = tiny_cfg(
        "+precision=mixed",
        "precision.plugin.dtype=float16",
        "precision.plugin.scaler.init_scale=16777216",
        "trainer.max_epochs=1",
        "++trainer.limit_val_batches=0",  # FP16 sliding-window validation is slow on CPU and beside the point
        "test=false",
    )
    with caplog.at_level("INFO", logger="medseg.precision.plugin"):
        train(cfg)
    lines = [r.getMessage() for r in caplog.records if "overflowed" in r.getMessage()]
    assert lines and all(" in net." in line and "forward output" not in line for line in lines), lines
    assert not (Path(cfg.paths.output_dir) / PLAN_FILE).exists()  # nothing decided, no plan written


class Flaky(nn.Module):
    """Scales its input per channel; the first ``poisoned`` backward passes put inf in its weight gradient only
    (not in the gradient it passes back), and a re-run of the batch is clean: an overflow that only the step's own
    gradients show, as the sporadic non-finite BF16 weight gradients of SwinUNETR on this CPU (RESULTS.md)."""

    def __init__(self, poisoned: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, 4, 1, 1, 1))
        self.poisoned = poisoned

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight * 1.0
        if self.poisoned > 0:
            self.poisoned -= 1
            weight.register_hook(lambda g: torch.full_like(g, float("inf")))
        return x * weight


class FlakyNet(HotNet):
    def __init__(self, poisoned: int) -> None:
        super().__init__()
        self.hot = Flaky(poisoned)


def test_overflow_not_reproduced_names_the_steps_nonfinite_gradients(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, prec = FlakyNet(poisoned=1), plugin()
    with caplog.at_level("INFO", logger="medseg.precision.plugin"):
        fit(model, prec, 3, tmp_path)

    lines = [r.getMessage() for r in caplog.records if "overflowed" in r.getMessage()]
    # only the flaky module's own weight gradient was non-finite: the conv before it got finite gradients back
    assert lines == [
        "precision advisor: step 0 overflowed (scale 256), not reproduced when re-run; "
        "non-finite gradients in the step itself in 1 module(s), the last: hot"
    ]
    assert (
        prec.scaler.skipped_steps == 1 and prec.precision_plan.decisions == []
    )  # named, not promoted: nothing to count
    assert all(torch.isfinite(p).all() for p in model.parameters())
