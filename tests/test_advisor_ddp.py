"""Two CPU processes on gloo: only rank 1's batches overflow (in the ``hot`` layer), yet both ranks name the
same culprit, promote it at the same step, and go on training with bit-identical replicas. The same for the headroom
rule: only rank 1's ``hot`` outputs come within a bit of 65504, and both ranks promote it on the same sampled step.

Run as a script in a subprocess, like tests/test_plugin_ddp.py; each rank writes its final state to a file.
"""

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medseg.precision import DynamicLossScaler, MasterWeightPrecision
from medseg.precision.advisor import PrecisionAdvisor
from medseg.precision.headroom import HeadroomRule
from medseg.precision.monitor import PrecisionMonitor

STEPS = 5


class Hot(nn.Module):
    """``overflow``: squares its input times ``gain * boost``, and ``boost = 1000`` (set on rank 1 only) passes
    FP16's 65504. ``headroom``: its input times ``gain``, on rank 1 rescaled so that its largest output is 2^15, one
    bit under 65504 (no overflow)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1))
        self.kind = kind
        self.loud = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "overflow":
            return (x * self.gain * (1000.0 if self.loud else 1.0)).square() * 1e-4
        h = x * self.gain
        return h * (2.0**15 / h.detach().abs().max()) if self.loud else h


class RankHotNet(LightningModule):
    """conv -> hot -> norm -> linear; only rank 1's ``hot`` is loud."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.hot = Hot(kind)
        self.norm = nn.InstanceNorm3d(4, affine=True)
        self.fc = nn.Linear(4, 2)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.hot.loud = self.global_rank == 1
        h = F.relu(self.norm(self.hot(self.conv(x))))
        return F.cross_entropy(self.fc(h.mean((2, 3, 4))).float(), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def run(out_dir: Path, kind: str) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(20, 1, 4, 4, 4, generator=g), torch.randint(0, 2, (20,), generator=g))
    model = RankHotNet(kind)
    rule = HeadroomRule(bits=2.0, samples=3) if kind == "headroom" else None
    plugin = MasterWeightPrecision(
        "float16",
        scaler=DynamicLossScaler(init_scale=2.0**8),
        advisor=PrecisionAdvisor(overflows=2, window=10, headroom=rule),
    )
    # the headroom rule reads the per-layer abs-maxes PrecisionMonitor samples (here every step)
    callbacks = [PrecisionMonitor(every_n_steps=1)] if kind == "headroom" else []
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        plugins=[plugin],
        callbacks=callbacks,
        max_steps=STEPS,
        barebones=True,
    )
    trainer.fit(model, DataLoader(data, batch_size=2))
    result = {
        "masters": [m.detach() for m in plugin.master_params],
        "weights": [p.detach() for p in model.parameters()],
        "plan": plugin.precision_plan.to_dict(),
        "skipped": plugin.scaler.skipped_steps,
        "overflow": plugin.last_step["overflow"],
    }
    torch.save(result, out_dir / f"rank{trainer.global_rank}.pt")
    # close gloo before the interpreter exits, as tests/test_plugin_ddp.py does (a rank once aborted there at exit)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize(("kind", "step", "skipped"), [("overflow", 1, 2), ("headroom", 2, 0)])
def test_ranks_promote_the_same_layer_together(tmp_path: Path, kind: str, step: int, skipped: int) -> None:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(tmp_path), kind],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks: list[dict[str, Any]] = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for state in ranks:
        decisions = state["plan"]["decisions"]
        assert [(d["layer"], d["step"], d["where"]) for d in decisions] == [("hot", step, "forward output")]
        assert state["skipped"] == skipped and state["overflow"] == 0  # trained on after the promotion
    for key in ("masters", "weights"):
        assert all(torch.equal(a, b) for a, b in zip(ranks[0][key], ranks[1][key], strict=True))
    hot_weight = ranks[0]["weights"][2]
    assert hot_weight.dtype == torch.float32 and ranks[0]["weights"][0].dtype == torch.float16


if __name__ == "__main__":
    run(Path(sys.argv[1]), sys.argv[2])
