"""Two CPU processes on gloo: when one rank overflows, both skip, and the replicas stay bit-identical.

The test runs this file as a script in a subprocess (``strategy="ddp"`` relaunches the script for rank 1),
sturdier under pytest than ``ddp_spawn`` pickling test objects. Each rank writes its final state to a file.
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

LOSS_INF_STEP = 1  # rank 1's loss is inf: DDP's gradient all-reduce spreads the inf to rank 0 by itself
GRAD_INF_STEP = 2  # rank 1 puts inf in its gradient after DDP's all-reduce: only found_inf's all-reduce helps
STEPS = 4


class RankNet(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm3d(4)
        self.fc = nn.Linear(4, 2)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3, 4)))
        loss = F.cross_entropy(logits.float(), y)
        if self.global_rank == 1 and self.global_step == LOSS_INF_STEP:
            loss = loss * float("inf")
        return loss

    def on_after_backward(self) -> None:
        if self.global_rank == 1 and self.global_step == GRAD_INF_STEP:
            self.fc.weight.grad[0, 0] = float("inf")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def run(out_dir: Path) -> None:
    """Train on 2 ranks and save each rank's masters, weights and scaler state."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 1, 4, 4, 4, generator=g), torch.randint(0, 2, (16,), generator=g))
    model = RankNet()
    plugin = MasterWeightPrecision("float16", scaler=DynamicLossScaler(init_scale=2.0**8))
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        plugins=[plugin],
        max_steps=STEPS,
        barebones=True,
    )
    trainer.fit(model, DataLoader(data, batch_size=2))
    result = {
        "masters": [m.detach() for m in plugin.master_params],
        "weights": [p.detach() for p in model.parameters()],
        "scaler": plugin.scaler.state_dict(),
        "last_step": plugin.last_step,
    }
    torch.save(result, out_dir / f"rank{trainer.global_rank}.pt")
    # close gloo before the interpreter exits: left to exit, its threads once aborted a rank after a finished fit
    # ("terminate called without an active exception", exit -6) in a fresh-clone test run
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_ranks_skip_together(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks: list[dict[str, Any]] = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]

    for state in ranks:
        assert state["scaler"]["overflows"] == 2  # both steps skipped on both ranks
        assert state["scaler"]["scale"] == 2.0**6
        assert state["last_step"] == {"loss_scale": 2.0**6, "overflow": 0, "skipped_steps": 2}
    for key in ("masters", "weights"):
        assert all(torch.equal(a, b) for a, b in zip(ranks[0][key], ranks[1][key], strict=True))
    assert ranks[0]["weights"][0].dtype == torch.float16 and ranks[0]["masters"][0].dtype == torch.float32


if __name__ == "__main__":
    run(Path(sys.argv[1]))
