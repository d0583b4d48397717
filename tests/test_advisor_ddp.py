"""Two CPU processes on gloo: only rank 1's batches overflow (in the ``hot`` layer), yet both ranks name the
same culprit, promote it at the same step, and go on training with bit-identical replicas.

Run as a script in a subprocess, like tests/test_plugin_ddp.py; each rank writes its final state to a file.
"""

import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medseg.precision import DynamicLossScaler, MasterWeightPrecision
from medseg.precision.advisor import PrecisionAdvisor

STEPS = 5


class Hot(nn.Module):
    """Squares its input times ``gain * boost``: ``boost = 1000`` (set on rank 1 only) passes FP16's 65504."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1))
        self.boost = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.gain * self.boost).square() * 1e-4


class RankHotNet(LightningModule):
    """conv -> hot -> norm -> linear; only rank 1's ``hot`` overflows."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.hot = Hot()
        self.norm = nn.InstanceNorm3d(4, affine=True)
        self.fc = nn.Linear(4, 2)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.hot.boost = 1000.0 if self.global_rank == 1 else 1.0
        h = F.relu(self.norm(self.hot(self.conv(x))))
        return F.cross_entropy(self.fc(h.mean((2, 3, 4))).float(), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def run(out_dir: Path) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(20, 1, 4, 4, 4, generator=g), torch.randint(0, 2, (20,), generator=g))
    model = RankHotNet()
    plugin = MasterWeightPrecision(
        "float16", scaler=DynamicLossScaler(init_scale=2.0**8), advisor=PrecisionAdvisor(overflows=2, window=10)
    )
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", plugins=[plugin], max_steps=STEPS, barebones=True)
    trainer.fit(model, DataLoader(data, batch_size=2))
    result = {
        "masters": [m.detach() for m in plugin.master_params],
        "weights": [p.detach() for p in model.parameters()],
        "plan": plugin.plan.to_dict(),
        "skipped": plugin.scaler.skipped_steps,
        "overflow": plugin.last_step["overflow"],
    }
    torch.save(result, out_dir / f"rank{trainer.global_rank}.pt")


def test_ranks_promote_the_same_layer_together(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks: list[dict[str, Any]] = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for state in ranks:
        decisions = state["plan"]["decisions"]
        assert [(d["layer"], d["step"], d["where"]) for d in decisions] == [("hot", 1, "forward output")]
        assert state["skipped"] == 2 and state["overflow"] == 0  # trained on after the promotion
    for key in ("masters", "weights"):
        assert all(torch.equal(a, b) for a, b in zip(ranks[0][key], ranks[1][key], strict=True))
    hot_weight = ranks[0]["weights"][2]
    assert hot_weight.dtype == torch.float32 and ranks[0]["weights"][0].dtype == torch.float16


if __name__ == "__main__":
    run(Path(sys.argv[1]))
