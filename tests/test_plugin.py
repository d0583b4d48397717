"""MasterWeightPrecision through the real Lightning Trainer on CPU, for float16 and bfloat16."""

import copy
import logging
from typing import Any
from unittest.mock import Mock

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medseg.precision import DynamicLossScaler, MasterWeightPrecision
from medseg.precision.export import export_fp32, main

LOW = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_g = torch.Generator().manual_seed(0)
# 8 samples in batches of 2: four steps an epoch, the same batches in the same order every epoch
DATA = TensorDataset(torch.randn(8, 1, 4, 4, 4, generator=_g), torch.randint(0, 2, (8,), generator=_g))
QUIET = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
# CUDA variants run only with `-m gpu` on a machine with a GPU (the default run deselects them)
NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, NO_CUDA])]


class TinyNet(LightningModule):
    """Conv3d + InstanceNorm3d + BatchNorm3d + Linear; the loss is made inf/NaN on chosen global steps."""

    def __init__(self, bad_steps: tuple[int, ...] = (), bad_value: float = float("inf"), adam: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.inorm = nn.InstanceNorm3d(4, affine=True)
        self.bn = nn.BatchNorm3d(4)
        self.fc = nn.Linear(4, 2)
        self.loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0]))
        self.bad_steps, self.bad_value, self.adam = bad_steps, bad_value, adam
        self.batch_dtypes: list[tuple[torch.dtype, torch.dtype]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.inorm(self.conv(x))))
        return self.fc(h.mean((2, 3, 4)))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.batch_dtypes.append((x.dtype, y.dtype))
        loss = self.loss_fn(self(x), y)  # low-precision logits: the plugin computes losses in FP32
        if self.global_step in self.bad_steps:
            loss = loss * self.bad_value
        return loss

    def configure_optimizers(self) -> Any:
        if not self.adam:
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def fit(model: LightningModule, plugin: MasterWeightPrecision, max_steps: int, **kwargs: Any) -> Trainer:
    ckpt_path = kwargs.pop("ckpt_path", None)
    kwargs = {"barebones": True, "accelerator": "cpu", "devices": 1} | kwargs
    trainer = Trainer(plugins=[plugin], max_steps=max_steps, **kwargs)
    trainer.fit(model, DataLoader(DATA, batch_size=2), ckpt_path=ckpt_path)
    return trainer


def small_scaler(**kwargs: Any) -> DynamicLossScaler:
    # 2**16 overflows on the first steps of this tiny net; start lower so only the injected steps overflow
    return DynamicLossScaler(init_scale=2.0**8, **kwargs)


@pytest.mark.parametrize("norms_in_float32", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_convert_module_keeps_norms_fp32(dtype: str, norms_in_float32: bool) -> None:
    low = LOW[dtype]
    net = TinyNet()
    plugin = MasterWeightPrecision(dtype, norms_in_float32=norms_in_float32)
    plugin.convert_module(plugin.convert_module(net))  # twice: hooks must not pile up

    assert net.conv.weight.dtype == net.fc.weight.dtype == net.fc.bias.dtype == low
    for norm in (net.inorm, net.bn):
        assert norm.weight.dtype == norm.bias.dtype == torch.float32
        # cast hooks only where asked for: by default the kernels take the low dtype themselves
        assert len(norm._forward_pre_hooks) == len(norm._forward_hooks) == int(norms_in_float32)
    assert net.bn.running_mean.dtype == torch.float32 and net.bn.num_batches_tracked.dtype == torch.int64
    assert net.loss_fn.weight.dtype == torch.float32
    x = torch.randn(2, 1, 4, 4, 4, dtype=low)
    assert net.bn(net.conv(x)).dtype == low  # statistics in FP32, output in the low dtype
    logits = net(x)
    assert logits.dtype == low
    assert net.loss_fn(input=logits, target=torch.tensor([0, 1])).dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_type", [nn.InstanceNorm3d, nn.BatchNorm3d])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_norm_statistics_do_not_overflow(dtype: str, norm_type: type[nn.Module], device: str) -> None:
    """Activations whose squares (and sums) exceed FP16's 65504: the norm must still match FP32."""
    low = LOW[dtype]
    x32 = torch.randn(2, 4, 16, 16, 16, generator=torch.Generator().manual_seed(1)) * 300 + 1000
    x = x32.to(device=device, dtype=low)
    # what a norm computing its variance in FP16 would get: inf, so this input would catch one
    assert not torch.isfinite((x.to(torch.float16) ** 2).sum()).item()
    norm = norm_type(4, affine=True).to(device)
    reference = copy.deepcopy(norm)(x.float())  # FP32 norm of the same rounded input
    plugin = MasterWeightPrecision(dtype)
    plugin.convert_module(norm)
    assert not norm._forward_pre_hooks  # fed the low dtype directly
    x.requires_grad_(True)
    out = norm(x)
    out.float().square().sum().backward()
    assert out.dtype == low and x.grad is not None and x.grad.dtype == low
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    # normalised values are O(1): the only error left is rounding the output to the low dtype
    tolerance = 2e-3 if dtype == "float16" else 2e-2
    assert (out.float() - reference).abs().max().item() < tolerance
    assert norm.weight.grad is not None and norm.weight.grad.dtype == torch.float32


def test_auto_dtype_is_bfloat16_on_cpu(caplog: pytest.LogCaptureFixture) -> None:
    plugin = MasterWeightPrecision("auto")
    with caplog.at_level(logging.INFO, logger="medseg.precision.plugin"):
        plugin.convert_module(TinyNet())
    assert plugin.dtype == torch.bfloat16 and plugin.precision == "bf16-true"
    assert "resolved to bfloat16" in caplog.text
    assert plugin.scaler is not None and not plugin.scaler.dynamic and plugin.scaler.scale == 1.0


def test_convert_input_leaves_integer_labels() -> None:
    plugin = MasterWeightPrecision("float16")
    batch = {"image": torch.randn(2, 3), "label": torch.ones(2, dtype=torch.int64), "extra": [torch.zeros(1)]}
    out = plugin.convert_input(batch)
    assert out["image"].dtype == out["extra"][0].dtype == torch.float16
    assert out["label"].dtype == torch.int64


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_masters_after_fit(dtype: str) -> None:
    low = LOW[dtype]
    model, plugin = TinyNet(), MasterWeightPrecision(dtype, scaler=small_scaler() if dtype == "float16" else None)
    trainer = fit(model, plugin, max_steps=3)

    assert model.batch_dtypes == [(low, torch.int64)] * 3  # Lightning's convert_input: image cast, label not
    optimizer = trainer.optimizers[0]
    model_params, masters = plugin.param_pairs(optimizer)
    in_optimizer = [p for g in optimizer.param_groups for p in g["params"]]
    assert all(p is m for p, m in zip(in_optimizer, masters, strict=True))
    assert plugin.main_params(optimizer) is masters
    for (name, param), p, m in zip(model.named_parameters(), model_params, masters, strict=True):
        assert param is p
        assert m.dtype == torch.float32
        if name.startswith(("inorm", "bn")):
            assert p.dtype == torch.float32 and m is p  # norm weights are their own masters
        else:
            assert p.dtype == low and m.data_ptr() != p.data_ptr()
            assert torch.equal(p, m.to(low))  # the model holds the rounded masters
    assert trainer.precision == ("16-true" if dtype == "float16" else "bf16-true")
    assert plugin.last_step == {"loss_scale": plugin.scaler.scale, "overflow": 0, "skipped_steps": 0}


class Snapshot(Callback):
    """Copies of weights, masters, optimizer state and scaler around training batch ``batch_idx``."""

    def __init__(self, batch_idx: int) -> None:
        self.batch_idx = batch_idx
        self.before: dict[str, Any] = {}
        self.after: dict[str, Any] = {}

    @staticmethod
    def take(trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        plugin = trainer.precision_plugin
        return {
            # parameters only: BatchNorm running statistics rightly move in the forward pass of a skipped step
            "weights": [p.detach().clone() for p in pl_module.parameters()],
            "masters": [m.detach().clone() for m in plugin.master_params],
            "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()["state"]),
            "scale": plugin.scaler.scale,
            "skipped": plugin.scaler.skipped_steps,
            "last_step": dict(plugin.last_step),
        }

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if args[-1] == self.batch_idx:
            self.before = self.take(trainer, pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if args[-1] == self.batch_idx:
            self.after = self.take(trainer, pl_module)


def _all_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


class StepCalls(Callback):
    """How often `optimizer.step` ran."""

    calls = 0

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trainer.optimizers[0].register_step_pre_hook(lambda *_: setattr(self, "calls", self.calls + 1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize(
    ("dtype", "dynamic_bf16"),
    [("float16", False), ("bfloat16", False), ("bfloat16", True)],
    ids=["float16", "bfloat16-static", "bfloat16-dynamic"],
)
def test_overflow_skips_the_step(dtype: str, dynamic_bf16: bool, optimizer: str, device: str) -> None:
    scaler = small_scaler() if dtype == "float16" or dynamic_bf16 else None
    plugin = MasterWeightPrecision(dtype, scaler=scaler, scale_bfloat16=scaler is not None)
    model, snap, calls = TinyNet(bad_steps=(2,), adam=optimizer == "adam"), Snapshot(batch_idx=2), StepCalls()
    fit(model, plugin, max_steps=4, callbacks=[snap, calls], accelerator="gpu" if device == "cuda" else "cpu")
    before, after = snap.before, snap.after

    # fused Adam is queued before the skip decision and skips itself on the device (its step count undone);
    # SGD is not stepped at all on the skipped step
    assert calls.calls == (4 if optimizer == "adam" else 3)
    assert _all_equal(before["weights"], after["weights"])
    assert _all_equal(before["masters"], after["masters"])
    assert before["optimizer"].keys() == after["optimizer"].keys() and len(before["optimizer"]) > 0
    state_keys = {"exp_avg", "exp_avg_sq", "step"} if optimizer == "adam" else {"momentum_buffer"}
    for key, state in before["optimizer"].items():
        assert set(state) == state_keys
        assert all(torch.equal(state[k], after["optimizer"][key][k]) for k in state_keys)
    assert after["skipped"] == before["skipped"] + 1 == 1
    expected_scale = before["scale"] / 2 if scaler is not None else 1.0
    assert after["scale"] == expected_scale
    assert after["last_step"] == {"loss_scale": expected_scale, "overflow": 1, "skipped_steps": 1}
    # and the step after it does train: the weights move again
    assert plugin.last_step["overflow"] == 0
    assert not _all_equal(after["masters"], [m.detach() for m in plugin.master_params])


class GradNorms(Callback):
    """Master gradient norms before clipping (on_before_optimizer_step) and at optimizer.step (after it)."""

    def __init__(self) -> None:
        self.before_clip: list[float] = []
        self.at_step: list[float] = []

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        optimizer = trainer.optimizers[0]

        def record(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
            assert all(g.dtype == torch.float32 for g in grads)
            self.at_step.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

        optimizer.register_step_pre_hook(record)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        grads = [p.grad for p in trainer.precision_plugin.main_params(optimizer) if p.grad is not None]
        self.before_clip.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())


def test_clipping_acts_on_unscaled_fp32_master_grads() -> None:
    clip, steps = 1e-3, 3
    plugin = MasterWeightPrecision("float16", scaler=small_scaler(), track_grad_norm=True)
    plugin.main_params = Mock(wraps=plugin.main_params)
    norms = GradNorms()
    trainer = fit(TinyNet(), plugin, max_steps=steps, gradient_clip_val=clip, callbacks=[norms])

    optimizer = trainer.optimizers[0]
    clip_calls = [c for c in plugin.main_params.call_args_list if c.args[0] is optimizer]
    assert len(clip_calls) >= steps  # at least once per step, from clip_grad_norm_
    assert len(norms.at_step) == steps
    assert all(n <= clip * (1 + 1e-5) for n in norms.at_step)
    # unscaled norms are well above the clip value, scaled ones would be orders of magnitude above it
    assert all(10 * clip < n < 1e3 for n in norms.before_clip)
    assert min(norms.before_clip) * plugin.scaler.scale > 1e4 * clip
    assert plugin.last_step["grad_norm"].item() == pytest.approx(norms.before_clip[-1], rel=1e-5)


# ---- why masters matter: updates below half an ulp of the weights ----
N_SAMPLES, N_FEATURES, N_STEPS, LR = 64, 8, 300, 2e-3
W_START, W_TARGET = 1.0, 1.1


class LinearFit(LightningModule):
    """Least squares on inputs with X^T X / N = I, so the gradient is exactly 2 (w - w*)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(N_FEATURES, 1, bias=False)
        nn.init.constant_(self.lin.weight, W_START)
        self.losses: list[float] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self.lin(x).float(), y.float())
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


def _fit_linear(
    precision: str | None = None,
    plugin: MasterWeightPrecision | None = None,
) -> tuple[LinearFit, float]:
    q, _ = torch.linalg.qr(torch.randn(N_SAMPLES, N_FEATURES, generator=torch.Generator().manual_seed(0)))
    x = q * N_SAMPLES**0.5
    w_target = torch.full((N_FEATURES,), W_TARGET)
    y = (x @ w_target)[:, None]
    model = LinearFit()
    trainer = Trainer(
        accelerator="cpu", max_steps=N_STEPS, barebones=True, precision=precision, plugins=plugin and [plugin]
    )
    trainer.fit(model, DataLoader([(x, y)] * N_STEPS, batch_size=None))
    # judge every run by the FP32 loss of its FP32 weights: the masters where there are masters
    w = (plugin.master_params[0] if plugin else model.lin.weight).detach().float()[0]
    return model, ((x @ w - x @ w_target) ** 2).mean().item()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_masters_keep_updates_below_half_an_ulp(dtype: str) -> None:
    low = LOW[dtype]
    # largest update: lr * 2 * (w* - w) = 4e-4 < half an ulp at 1.0 (fp16: 4.9e-4, bf16: 3.9e-3)
    assert LR * 2 * (W_TARGET - W_START) < torch.finfo(low).eps / 2
    fp32_model, fp32_loss = _fit_linear("32-true")
    half_model, half_loss = _fit_linear("16-true" if dtype == "float16" else "bf16-true")
    _, mixed_loss = _fit_linear(plugin=MasterWeightPrecision(dtype))
    initial = fp32_model.losses[0]
    half_change = abs(half_model.losses[-1] - half_model.losses[0]) / half_model.losses[0]

    assert fp32_loss < 0.2 * initial  # the FP32 run really learns
    assert torch.all(half_model.lin.weight == W_START)  # without masters every update rounds away
    assert half_change < 1e-6 and half_loss == pytest.approx(initial, rel=1e-6)
    assert mixed_loss == pytest.approx(fp32_loss, rel=0.01)  # with masters: the FP32 result within 1%


# ---- exact resume ----
def _resume_plugin() -> MasterWeightPrecision:
    return MasterWeightPrecision("float16", scaler=small_scaler(growth_interval=2))


def _state(trainer: Trainer, plugin: MasterWeightPrecision, model: LightningModule) -> dict[str, Any]:
    return {
        "masters": [m.detach().clone() for m in plugin.master_params],
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()),
        "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
        "scaler": plugin.scaler.state_dict(),
    }


def _assert_identical(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_identical(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_identical(x, y)
    else:
        assert a == b


def test_exact_resume(tmp_path: Any) -> None:
    bad_steps, steps = (2, 5), 8  # one overflow before the checkpoint, one after
    model, plugin = TinyNet(bad_steps, adam=True), _resume_plugin()
    straight = _state(fit(model, plugin, max_steps=steps), plugin, model)

    # Saved by ModelCheckpoint at the last batch of epoch 0. (A `trainer.save_checkpoint` after a fit stopped
    # by max_steps at an epoch end resumes with an extra one-batch epoch in Lightning 2.6: data order shifts.)
    model, plugin = TinyNet(bad_steps, adam=True), _resume_plugin()
    saver = ModelCheckpoint(dirpath=tmp_path, filename="half", every_n_train_steps=steps // 2)
    fit(model, plugin, max_steps=steps // 2, barebones=False, callbacks=[saver], **QUIET)
    assert plugin.scaler.skipped_steps == 1

    model, plugin = TinyNet(bad_steps, adam=True), _resume_plugin()
    calls = Mock()
    plugin.connect = calls.connect = Mock(wraps=plugin.connect)
    plugin.load_state_dict = calls.load_state_dict = Mock(wraps=plugin.load_state_dict)
    resumed_trainer = fit(model, plugin, max_steps=steps, ckpt_path=tmp_path / "half.ckpt")
    resumed = _state(resumed_trainer, plugin, model)

    # Lightning restores the plugin state after strategy.setup() has called connect()
    assert [name for name, *_ in calls.mock_calls] == ["connect", "load_state_dict"]
    assert straight["scaler"]["overflows"] == 2 and straight["scaler"]["scale"] != 2.0**8
    assert straight["scheduler"]["last_epoch"] == steps
    _assert_identical(straight, resumed)


def test_checkpoint_loads_weights_only_and_exports_fp32(tmp_path: Any) -> None:
    model, plugin = TinyNet(), MasterWeightPrecision("float16", scaler=small_scaler())
    trainer = fit(model, plugin, max_steps=3)
    trainer.save_checkpoint(tmp_path / "last.ckpt")

    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    state = ckpt["MasterWeightPrecision"]
    assert state["dtype"] == "float16" and state["scaler"] == plugin.scaler.state_dict()
    assert ckpt["state_dict"]["conv.weight"].dtype == torch.float16

    main([str(tmp_path / "last.ckpt"), str(tmp_path / "fp32.pt")])
    exported = torch.load(tmp_path / "fp32.pt", weights_only=True)
    assert export_fp32(tmp_path / "last.ckpt", tmp_path / "again.pt").exists()
    weights = exported["state_dict"]
    assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())
    assert weights["bn.num_batches_tracked"].dtype == torch.int64
    masters = dict(zip(state["names"][0], plugin.master_params, strict=True))
    assert masters.keys() == {n for n, _ in model.named_parameters()}
    for name, master in masters.items():
        assert torch.equal(weights[name], master)
    assert torch.equal(weights["bn.running_var"], model.bn.running_var)
    fresh = TinyNet()
    fresh.load_state_dict(weights)  # a plain FP32 model loads it


@pytest.mark.parametrize(
    ("scaler_kwargs", "max_skips", "message"),
    [
        ({}, 3, r"global step 2: 3 steps in a row were skipped"),
        ({"init_scale": 4.0, "min_scale": 1.0}, 50, r"global step 2: the loss scale is at min_scale"),
    ],
    ids=["consecutive", "min-scale"],
)
def test_nan_every_step_stops_training(scaler_kwargs: dict, max_skips: int, message: str) -> None:
    scaler = DynamicLossScaler(**({"init_scale": 2.0**8} | scaler_kwargs))
    plugin = MasterWeightPrecision("float16", scaler=scaler, max_consecutive_skips=max_skips)
    with pytest.raises(RuntimeError, match=message):
        fit(TinyNet(bad_steps=tuple(range(10)), bad_value=float("nan")), plugin, max_steps=10)


class ManualNet(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


def test_manual_optimization_is_refused() -> None:
    with pytest.raises(MisconfigurationException, match="automatic optimization only"):
        fit(ManualNet(), MasterWeightPrecision("bfloat16"), max_steps=1)


def test_connect_moves_state_of_several_optimizers_and_applies_early_state() -> None:
    net = TinyNet()
    plugin = MasterWeightPrecision("float16")
    plugin.convert_module(net)
    conv_opt = torch.optim.SGD(net.conv.parameters(), lr=0.1, momentum=0.9)
    groups = [{"params": net.fc.parameters()}, {"params": net.bn.parameters(), "lr": 0.01}]
    rest = torch.optim.SGD(groups, lr=0.1)
    for p in net.conv.parameters():
        p.grad = torch.ones_like(p)
    conv_opt.step()  # momentum state in float16, keyed by the model's parameters

    saved = {
        "dtype": "float16",
        "scaler": {},
        "masters": [[torch.full_like(p, 3.0, dtype=torch.float32) for p in net.conv.parameters()], []],
    }
    saved["scaler"] = DynamicLossScaler(init_scale=8.0).state_dict()
    saved["masters"][1] = [p.detach().float() + 1 for p in [*net.fc.parameters(), *net.bn.parameters()]]
    plugin.load_state_dict(saved)  # before connect(): kept and applied once the masters exist
    plugin.connect(net, [conv_opt, rest], [])

    conv_model, conv_masters = plugin.param_pairs(conv_opt)
    assert all(p is q for p, q in zip(conv_model, net.conv.parameters(), strict=True))
    assert all(m in conv_opt.state for m in conv_masters)
    assert not any(p in conv_opt.state for p in conv_model)
    assert all(conv_opt.state[m]["momentum_buffer"].dtype == torch.float32 for m in conv_masters)
    assert all(torch.equal(m, torch.full_like(m, 3.0)) for m in conv_masters)
    assert torch.equal(net.conv.weight, torch.full_like(net.conv.weight, 3.0))  # model = rounded masters
    assert rest.param_groups[1]["lr"] == 0.01 and rest.param_groups[1]["params"][0] is net.bn.weight
    assert plugin.scaler.scale == 8.0
    assert len(plugin.master_params) == 6  # conv, fc and bn weights and biases


class TestedNet(TinyNet):
    def test_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("test/loss", self.loss_fn(self(batch[0]), batch[1]))


def test_fit_then_test_from_checkpoint(tmp_path: Any) -> None:
    """`trainer.test(ckpt_path=...)` after `fit` (what medseg.train does) connects the same optimizers again,
    and loads the plugin state of the checkpoint: the masters must survive both."""
    model, plugin = TestedNet(adam=True), MasterWeightPrecision("float16", scaler=small_scaler())
    trainer = fit(model, plugin, max_steps=3, default_root_dir=tmp_path, barebones=False, logger=False,
                  enable_progress_bar=False)  # fmt: skip
    masters = [m.clone() for m in plugin.master_params]
    best = trainer.checkpoint_callback.best_model_path
    [result] = trainer.test(model, DataLoader(DATA, batch_size=2), ckpt_path=best, verbose=False)
    assert result["test/loss"] > 0
    assert all(torch.equal(a, b) for a, b in zip(masters, plugin.master_params, strict=True))


def test_master_weights_finds_the_plugin_and_nothing_else():
    """`medseg.precision.view.master_weights`, what callbacks and the module ask instead of `isinstance`."""
    from medseg.precision.view import master_weights

    plugin = MasterWeightPrecision()
    assert master_weights(Trainer(plugins=[plugin], accelerator="cpu", logger=False)) is plugin
    for precision in ("32-true", "bf16-mixed", "bf16-true"):
        assert master_weights(Trainer(precision=precision, accelerator="cpu", logger=False)) is None


def test_checkpoint_key_is_the_plugin_class_name():
    """Lightning saves the plugin's state under its class name; `medseg.precision.state` reads it by that name."""
    from medseg.precision.state import STATE_KEY

    assert MasterWeightPrecision.__qualname__ == STATE_KEY
