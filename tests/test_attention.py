"""Op-level FP32 attention under the plugin in FP16: MONAI's SABlock and WindowAttention compute their logits and
softmax in FP32 (weights still FP16), so logits past FP16's range stay finite; without it they overflow."""

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from monai.networks.blocks import SABlock
from monai.networks.nets.swin_unetr import WindowAttention
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medseg.precision import DynamicLossScaler, MasterWeightPrecision
from medseg.precision.convert import keep_fp32

pytest.importorskip("einops", reason="MONAI's SABlock needs einops (pip install -e '.[transformers]')")

_g = torch.Generator().manual_seed(0)
TOKENS = TensorDataset(torch.randn(4, 8, 16, generator=_g), torch.randint(0, 2, (4,), generator=_g))


class AttnNet(LightningModule):
    """SABlock then WindowAttention (one 2^3 window of 8 tokens, 16 channels, 2 heads), then a linear head. Their
    query/key rows are multiplied by ``qk_gain``: at 1000 their logits pass 10^5, past what FP16 holds."""

    def __init__(self, qk_gain: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.sa = SABlock(hidden_size=16, num_heads=2, save_attn=True)
        self.win = WindowAttention(dim=16, num_heads=2, window_size=(2, 2, 2), qkv_bias=True)
        self.fc = nn.Linear(16, 2)
        with torch.no_grad():
            self.sa.qkv.weight[:32] *= qk_gain
            self.win.qkv.weight[:32] *= qk_gain
        self.softmax_inputs: list[torch.dtype] = []  # dtypes WindowAttention's softmax saw
        self.win.softmax.register_forward_pre_hook(lambda m, args: self.softmax_inputs.append(args[0].dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.win(x + self.sa(x), None).mean(1))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x).float(), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def fit(model: AttnNet, tmp_path: Path, **kwargs: Any) -> MasterWeightPrecision:
    prec = MasterWeightPrecision("float16", scaler=DynamicLossScaler(init_scale=2.0**8), **kwargs)
    trainer = Trainer(plugins=[prec], max_steps=2, barebones=True, accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(model, DataLoader(TOKENS, batch_size=2))
    return prec


def test_attention_logits_and_softmax_run_in_fp32_with_fp16_weights(tmp_path: Path) -> None:
    model = AttnNet(qk_gain=1.0)
    fit(model, tmp_path)
    assert model.sa.att_mat.dtype == torch.float32  # SABlock's softmax output (save_attn), MONAI's attention_dtype
    assert set(model.softmax_inputs) == {torch.float32}
    assert model.sa.qkv.weight.dtype == model.win.qkv.weight.dtype == model.win.proj.weight.dtype == torch.float16


@pytest.mark.parametrize("fp32_attention", [True, False])
def test_logits_past_fp16_range_stay_finite_only_with_fp32_attention(tmp_path: Path, fp32_attention: bool) -> None:
    model = AttnNet(qk_gain=1000.0)
    prec = fit(model, tmp_path, fp32_attention=fp32_attention)
    with torch.no_grad():
        out = model(TOKENS.tensors[0].half())
    assert bool(torch.isfinite(out).all()) == fp32_attention
    # with FP32 logits both steps trained; with FP16 ones both overflowed and were skipped
    assert prec.scaler.skipped_steps == (0 if fp32_attention else 2)


def test_a_promoted_attention_block_still_runs(tmp_path: Path) -> None:
    """The hooks look the dtype up at call time: a block kept wholly in FP32 (fp32_modules) hands FP32 on."""
    model = AttnNet(qk_gain=1.0)
    prec = fit(model, tmp_path, fp32_modules=["sa", "win"])
    assert model.sa.qkv.weight.dtype == torch.float32 and prec.scaler.skipped_steps == 0
    keep_fp32(model.win, torch.float16)  # converting again must not stack hooks or break
    assert torch.isfinite(model(TOKENS.tensors[0].half())).all()
