"""The precision advisor: its cost, and a demonstration of it rescuing FP16 training, each printed as a table.

    python benchmarks/advisor.py cost [--size 96 --steps 4 --repeats 2]
    python benchmarks/advisor.py demo [--steps 40 --size 16 --qk-gain 1000]

``cost``: MONAI UNet (conf/model/unet.yaml's channels) on one ``size``^3 patch, medseg's plugin in BF16 (what
``+precision=mixed`` is on CPU), advisor off and on, fits alternated ``repeats`` times; per mode the fastest step
(min of N, after the first step of each fit). A third row forces an overflow on one step (inf loss) with the
advisor on: that step's time over a normal one is what a located overflow costs (it re-runs the batch).

``demo``: a layer *made* to overflow, not a failure found in the wild (none was found on this CPU, see
benchmarks/RESULTS.md): a small 3D U-Net whose input features also go through a MONAI ``SABlock`` (self-attention
over 6^3 pooled tokens) with its query/key weights scaled x1000, so the attention logits pass FP16's 65504 while
FP32 (and BF16) hold them (x300 did not overflow). Trained on synthetic spheres in each mode; foreground Dice on
held-out volumes.
"""

import argparse
import math
import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from monai.losses import DiceCELoss
from monai.networks.blocks import SABlock
from monai.networks.nets import UNet
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medseg.precision import DynamicLossScaler, MasterWeightPrecision
from medseg.precision.advisor import PrecisionAdvisor
from medseg.tracking.tables import markdown_table


class Seg(LightningModule):
    def __init__(self, net: nn.Module, inf_step: int = -1) -> None:
        super().__init__()
        self.net, self.loss_fn, self.inf_step = net, DiceCELoss(to_onehot_y=True, softmax=True), inf_step

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss_fn(self.net(x).float(), y)
        return loss * math.inf if self.global_step == self.inf_step else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


class StepTimes(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.times.append(time.perf_counter() - self._start)


def fit(model: LightningModule, plugin: Any, data: TensorDataset, steps: int, batch: int, **kw: Any) -> Trainer:
    args = {"plugins": [plugin]} if isinstance(plugin, MasterWeightPrecision) else {"precision": plugin}
    root = tempfile.mkdtemp(prefix="advisor_bench_")  # precision_plan.yaml lands here, not in the repo
    kw = {"accelerator": "cpu", "devices": 1, "barebones": True, "default_root_dir": root} | args | kw
    trainer = Trainer(max_steps=steps, **kw)
    trainer.fit(model, DataLoader(data, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0)))
    return trainer


def cost(size: int, steps: int, repeats: int) -> None:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(steps, 1, size, size, size, generator=g),
        torch.randint(0, 2, (steps, 1, size, size, size), generator=g),
    )

    def unet() -> nn.Module:
        torch.manual_seed(0)
        return UNet(3, 1, 2, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2, norm="INSTANCE")

    best: dict[str, float] = {}
    overflow_ratio = []
    for _ in range(repeats):
        for mode, advisor, inf_step in (("advisor off", None, -1), ("advisor on", PrecisionAdvisor(), -1),
                                        ("advisor on, overflow step", PrecisionAdvisor(), steps - 1)):  # fmt: skip
            timer = StepTimes()
            plugin = MasterWeightPrecision("bfloat16", advisor=advisor)
            fit(Seg(unet(), inf_step), plugin, data, steps, 1, callbacks=[timer])
            normal = min(timer.times[1:-1] if inf_step >= 0 else timer.times[1:])
            best[mode] = min(best.get(mode, math.inf), normal)
            if inf_step >= 0:
                overflow_ratio.append(timer.times[-1] / normal)
    off = best["advisor off"]
    rows = [
        {"mode": "advisor off", "step s (min)": f"{off:.3f}", "vs off": "1.000"},
        {"mode": "advisor on", "step s (min)": f"{best['advisor on']:.3f}",
         "vs off": f"{best['advisor on'] / off:.3f}"},
        {"mode": "advisor on, the overflow step itself", "step s (min)": "-",
         "vs off": f"{min(overflow_ratio):.2f} x a normal step"},
    ]  # fmt: skip
    print(f"UNet 16-32-64-128, {size}^3, batch 1, plugin bfloat16, {steps} steps x {repeats} fits per mode")
    print(markdown_table(rows))


class AttnUNet(nn.Module):
    """stem conv -> (+ upsampled self-attention over 6^3 pooled tokens) -> MONAI UNet."""

    def __init__(self, qk_gain: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv3d(1, 8, 3, padding=1)
        self.attn = SABlock(hidden_size=8, num_heads=2)
        with torch.no_grad():  # query and key rows of the fused qkv projection: logits grow with gain^2
            self.attn.qkv.weight[:16] *= qk_gain
        self.unet = UNet(3, 8, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1, norm="INSTANCE")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        pooled = F.adaptive_avg_pool3d(h, 6)
        tokens = self.attn(pooled.flatten(2).transpose(1, 2))  # (B, 216, 8)
        att = tokens.transpose(1, 2).reshape(pooled.shape)
        return self.unet(h + F.interpolate(att, size=h.shape[2:], mode="nearest"))


def spheres(n: int, size: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"))
    images, labels = [], []
    for _ in range(n):
        centre = torch.rand(3, 1, 1, 1, generator=g) * size * 0.5 + size * 0.25
        radius = 3 + torch.rand(1, generator=g).item() * size * 0.2
        label = ((grid - centre).square().sum(0) < radius**2).long()
        images.append((label.float() + 0.7 * torch.randn(size, size, size, generator=g))[None])
        labels.append(label[None])
    return TensorDataset(torch.stack(images), torch.stack(labels))


@torch.no_grad()
def dice(net: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    dtype = next(p.dtype for p in net.parameters() if p.dtype != torch.float32) if any(
        p.dtype != torch.float32 for p in net.parameters()) else torch.float32  # fmt: skip
    pred = net(x.to(dtype)).float().argmax(1, keepdim=True)
    inter = (pred * y).sum().item()
    return 2 * inter / max((pred.sum() + y.sum()).item(), 1)


def demo(steps: int, qk_gain: float, size: int) -> None:
    train, val = spheres(32, size, 0), spheres(8, size, 1)
    modes: dict[str, Any] = {
        "fp32": "32-true",
        "half (16-true)": "16-true",
        # fp32_attention off: with it (the default) the SABlock's logits are FP32 and nothing overflows at all
        "mixed fp16, no advisor": lambda: MasterWeightPrecision(
            "float16", scaler=DynamicLossScaler(init_scale=2.0**10), fp32_attention=False
        ),
        "mixed fp16, advisor": lambda: MasterWeightPrecision(
            "float16", scaler=DynamicLossScaler(init_scale=2.0**10), advisor=PrecisionAdvisor(), fp32_attention=False
        ),
        "amp 16-mixed (CPU: bf16)": "16-mixed",
    }
    rows = []
    for mode, make in modes.items():
        plugin = make() if callable(make) else make
        model = Seg(AttnUNet(qk_gain))
        started, status = time.perf_counter(), "trained"
        try:
            trainer = fit(model, plugin, train, steps, 4)
            steps_done = trainer.global_step
        except RuntimeError as err:
            status, steps_done = f"stopped: {str(err).split(':')[1].strip()[:40]}", -1
        net = model.net
        params = list(net.parameters())
        low = sum(p.numel() for p in params if p.dtype in (torch.float16, torch.bfloat16))
        nan = any(not torch.isfinite(p).all() for p in params)
        is_plugin = isinstance(plugin, MasterWeightPrecision)
        rows.append({
            "mode": mode, "val Dice": f"{dice(net, val):.4f}", "status": status if not nan else "NaN weights",
            "skipped": plugin.scaler.skipped_steps if is_plugin else "-",
            "FP32 modules": ", ".join(plugin.precision_plan.fp32_modules) or "-" if is_plugin else "-",
            "params low %": f"{100 * low / sum(p.numel() for p in params):.1f}",
            "steps": steps_done, "wall s": f"{time.perf_counter() - started:.0f}",
        })  # fmt: skip
    print(f"AttnUNet (SABlock q/k x{qk_gain:g}), {size}^3 spheres, batch 4, {steps} steps, AdamW 3e-3")
    print(markdown_table(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["cost", "demo"])
    parser.add_argument("--size", type=int, help="cost: 96; demo: 16")
    parser.add_argument("--steps", type=int, help="cost: 4 per fit; demo: 40")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--qk-gain", type=float, default=1000.0)
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    if args.what == "cost":
        cost(args.size or 96, args.steps or 4, args.repeats)
    else:
        demo(args.steps or 40, args.qk_gain, args.size or 16)


if __name__ == "__main__":
    main()
