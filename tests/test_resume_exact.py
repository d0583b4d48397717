"""Exact resume in the configuration users run (issue 26): training bounded by `trainer.max_epochs`, a validation
round every epoch, the default callbacks (precision monitor, LR monitor, recovery checkpoint), the persistent cache,
a loader worker, distinct shuffled cases with augmentation on. A run resumed from a mid-epoch recovery checkpoint,
from one written just before a validation round that a crash cut short, from `interrupted.ckpt` (SIGTERM/Ctrl-C) or
from a SLURM `hpc_ckpt_<n>.ckpt` ends with the same weights, optimizer state, FP32 masters and loss scaler as the
run never interrupted. `max_steps` runs are covered by test_soak.py and test_interrupt.py."""

import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from medseg.train import train

from .conftest import compose_cfg
from .helpers import TINY, TINY_UNET

EPOCHS, STEPS_PER_EPOCH = 3, 3  # 6 training cases, batch 2
PRECISIONS = {
    "mixed": ["+precision=mixed", "precision.plugin.dtype=float16", "precision.plugin.scaler.init_scale=16384",
              "precision.plugin.scaler.growth_interval=2"],
    "fp32": ["+precision=fp32"],
    "amp": ["+precision=amp"],
}  # fmt: skip


def _cfg(dataset: Path, cache: Path, run_dir: Path, precision: str, *extra: str):
    return compose_cfg(
        [
            *TINY, *TINY_UNET, *PRECISIONS[precision],
            f"data.root={dataset}", "++data.synthesize=null", f"data.cache_dir={cache}", "data.cache=persistent",
            "data.num_workers=1", "seed=7", f"trainer.max_epochs={EPOCHS}", "trainer.deterministic=true",
            "test=false", f"paths.log_dir={run_dir.parent / 'logs'}",
            "callbacks.recovery_checkpoint.train_time_interval=null",
            *extra,
        ],
        run_dir,
    )  # fmt: skip


def _final(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


def _assert_identical(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert a["state_dict"].keys() == b["state_dict"].keys()
    differ = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not differ, f"{len(differ)} of {len(a['state_dict'])} tensors differ, e.g. {differ[:3]}"
    [opt_a], [opt_b] = a["optimizer_states"], b["optimizer_states"]
    for pa, pb in zip(opt_a["state"].values(), opt_b["state"].values(), strict=True):
        for k in pa:
            assert torch.equal(torch.as_tensor(pa[k]), torch.as_tensor(pb[k])), k
    assert a["lr_schedulers"] == b["lr_schedulers"]
    if "masters" in a.get("MasterWeightPrecision", {}):
        masters = (c["MasterWeightPrecision"]["masters"][0] for c in (a, b))
        for ma, mb in zip(*masters, strict=True):
            assert torch.equal(ma, mb)
        assert a["MasterWeightPrecision"]["scaler"] == b["MasterWeightPrecision"]["scaler"]
    # The best checkpoint was chosen from the same validation rounds.
    [best_a], [best_b] = ([v["best_model_score"] for k, v in c["callbacks"].items() if "val/dice" in k] for c in (a, b))
    assert best_a == best_b


class CrashInValidation(pl.Callback):
    """Fails in the validation round of epoch `epoch`, as a kill -9 there would stop the run."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.current_epoch == self.epoch and not trainer.sanity_checking:
            raise RuntimeError("crash inside validation")


class StopAt(pl.Callback):
    """Asks Lightning to stop after step `step` as Ctrl-C and SIGTERM do (medseg's GracefulInterrupt sets this flag),
    or, with `hpc=True`, saves `hpc_ckpt_<n>.ckpt` where SLURM's requeue signal handler puts it and stops."""

    def __init__(self, step: int, hpc: bool = False) -> None:
        self.step, self.hpc = step, hpc

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        if self.hpc:
            trainer.save_checkpoint(trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir))
            raise KeyboardInterrupt  # the job ends; SLURM starts it again in the same directory
        trainer._signal_connector.received_sigterm = True


@pytest.fixture(scope="module")
def reference(tiny_dataset, tmp_path_factory):
    """The uninterrupted run of each precision, trained once per module."""
    done: dict[str, dict] = {}
    tmp = tmp_path_factory.mktemp("reference")

    def get(precision: str) -> dict:
        if precision not in done:
            run = tmp / precision
            train(_cfg(tiny_dataset, tmp / "cache", run, precision))
            done[precision] = _final(run)
        return done[precision]

    return get


# fp32 and amp run with the long tests; `mixed` (masters and scaler too) in every run.
@pytest.mark.parametrize("precision", ["mixed", *(pytest.param(p, marks=pytest.mark.slow) for p in ("fp32", "amp"))])
def test_resume_from_mid_epoch_recovery_checkpoint_is_exact(precision, tiny_dataset, reference, tmp_path):
    # Recovery every 4 steps: the last one is at step 8, after 2 of epoch 2's 3 batches.
    every = ["callbacks.recovery_checkpoint.every_n_train_steps=4"]
    first = tmp_path / "first"
    train(_cfg(tiny_dataset, tmp_path / "cache", first, precision, *every))
    recovery = torch.load(first / "checkpoints" / "recovery.ckpt", weights_only=True)
    assert recovery["global_step"] == 8
    assert recovery["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 2, "batches": 2}]
    _assert_identical(_final(first), reference(precision))  # the recovery callback itself changes nothing

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(first / "checkpoints" / "recovery.ckpt", resumed / "checkpoints" / "recovery.ckpt")
    ckpt = resumed / "checkpoints" / "recovery.ckpt"
    train(_cfg(tiny_dataset, tmp_path / "cache", resumed, precision, *every, f"ckpt_path={ckpt}"))
    _assert_identical(_final(resumed), reference(precision))


def test_resume_after_a_crash_inside_validation_is_exact(tiny_dataset, reference, tmp_path):
    """Recovery after every epoch's last batch (step 3, 6, 9); the run dies in epoch 1's validation round, so the
    newest checkpoint is the one of step 6, written before that round: the resumed run validates epoch 1 first."""
    run = tmp_path / "run"
    every = ["callbacks.recovery_checkpoint.every_n_train_steps=3", "callbacks.interrupted_checkpoint=null"]
    crash = ["+callbacks.crash._target_=tests.test_resume_exact.CrashInValidation", "+callbacks.crash.epoch=1"]
    with pytest.raises(RuntimeError, match="crash inside validation"):
        train(_cfg(tiny_dataset, tmp_path / "cache", run, "mixed", *every, *crash))
    assert torch.load(run / "checkpoints" / "recovery.ckpt", weights_only=True)["global_step"] == 6
    train(_cfg(tiny_dataset, tmp_path / "cache", run, "mixed", *every, "ckpt_path=last"))
    _assert_identical(_final(run), reference("mixed"))


@pytest.mark.parametrize("hpc", [False, True], ids=["interrupted", "hpc"])
def test_resume_from_interrupted_or_hpc_checkpoint_is_exact(hpc, tiny_dataset, reference, tmp_path):
    run = tmp_path / "run"
    stop = [
        "+callbacks.stop._target_=tests.test_resume_exact.StopAt",
        "+callbacks.stop.step=4",
        f"+callbacks.stop.hpc={hpc}",
    ]
    with pytest.raises((SystemExit, KeyboardInterrupt)):
        train(_cfg(tiny_dataset, tmp_path / "cache", run, "mixed", *stop))
    saved = run / "hpc_ckpt_1.ckpt" if hpc else run / "checkpoints" / "interrupted.ckpt"
    assert torch.load(saved, weights_only=True)["global_step"] == 4  # mid-epoch 1
    train(_cfg(tiny_dataset, tmp_path / "cache", run, "mixed", "ckpt_path=last"))
    _assert_identical(_final(run), reference("mixed"))
