"""nnU-Net v2's trainer stopped by a wall-clock budget, for `benchmarks/peers/nnunet.py`.

Runs inside the peer virtual environment, not medseg's: `nnunet.py` copies this file into the installed package
(`nnunetv2/training/nnUNetTrainer/`), the only place `nnUNetv2_train` and `nnUNetv2_predict` both look a trainer up
by class name (`recursive_find_trainer_class_by_name`; `nnUNet_extTrainer` reaches training only).

Why a subclass and not `nnUNetTrainer_Xepochs`: a fixed epoch count fits a budget only after the epoch time is
known, and on a CPU shared with nothing else it still varies with the patch nnU-Net plans. This trainer keeps
everything of `nnUNetTrainer` (network, loss, SGD, augmentation, 250 + 50 iterations an epoch) and only
- re-plans the epoch count after every epoch (epochs done + the remaining time over the mean epoch time), so the
  poly learning rate reaches 0 at the deadline, as nnU-Net's own schedule does at its last epoch;
- shortens the epoch when fewer than MIN_EPOCHS of nnU-Net's 250 + 50 iterations fit in the budget (timed over
  the first PROBE_ITERATIONS steps): the poly LR steps once an epoch, and at 2-3 epochs (hippocampus, 30 min on
  2 CPU cores) or less than one (BraTS 2 mm, 9 min) it would hardly decay; the 250:50 ratio is kept;
- stops at the deadline even mid-epoch (the hard stop `trainer.max_time` is for medseg) and saves
  `checkpoint_final.pth`;
- skips the validation pass nnUNetv2_train runs after training: the comparison predicts with `nnUNetv2_predict`.

Environment (its constructor's signature is nnU-Net's, so settings come this way):
    MEDSEG_PEER_DEADLINE    time.time() at which training must stop (nnunet.py: its start + the budget)
    MEDSEG_PEER_ITERATIONS  "train,val" iterations per epoch (smoke runs: "2,1"); default nnU-Net's 250,50
    MEDSEG_PEER_MAX_EPOCHS  at most this many epochs (smoke runs: 2); default nnU-Net's 1000
"""

import json
import os
import time
from os.path import join

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

CUDA = torch.device("cuda")  # nnUNetTrainer's default device argument
MIN_EPOCHS = 10  # poly-LR steps a budget should hold at least
PROBE_ITERATIONS = 5  # training steps timed before the epoch length is fitted (data-loader start-up included)
VAL_COST = 1 / 3  # a validation iteration (forward only) against a training one


class nnUNetTrainerBudget(nnUNetTrainer):  # noqa: N801 - nnU-Net finds trainers by this naming scheme
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict, device=CUDA):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.deadline = float(os.environ.get("MEDSEG_PEER_DEADLINE", time.time() + 1800))
        train, val = os.environ.get("MEDSEG_PEER_ITERATIONS", "250,50").split(",")
        self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = int(train), int(val)
        self.max_epochs = int(os.environ.get("MEDSEG_PEER_MAX_EPOCHS", 1000))  # nnU-Net's default length
        self.num_epochs = self.max_epochs

    def replan_epochs(self, epoch_seconds: list[float]) -> None:
        """Epochs so far + the epochs left before the deadline, rounded (the deadline stops a last epoch that runs
        over it); the poly LR follows the new length."""
        remaining = self.deadline - time.time()
        fits = round(remaining / float(np.mean(epoch_seconds))) if remaining > 0 else 0
        self.num_epochs = min(self.max_epochs, self.current_epoch + fits)
        self.lr_scheduler.max_steps = max(self.num_epochs, 1)

    def fit_epoch_length(self, seconds: float, iterations: int, budget_left: float) -> None:
        """Fewer iterations an epoch (both kinds, in nnU-Net's ratio) when MIN_EPOCHS would not fit otherwise."""
        per_iteration = seconds / iterations
        epoch = per_iteration * (self.num_iterations_per_epoch + VAL_COST * self.num_val_iterations_per_epoch)
        if budget_left < MIN_EPOCHS * epoch:
            scale = budget_left / (MIN_EPOCHS * epoch)
            self.num_iterations_per_epoch = max(PROBE_ITERATIONS, int(self.num_iterations_per_epoch * scale))
            self.num_val_iterations_per_epoch = max(1, int(self.num_val_iterations_per_epoch * scale))
            self.print_to_log_file(
                f"budget: {per_iteration:.2f} s an iteration; epochs shortened to {self.num_iterations_per_epoch} "
                f"+ {self.num_val_iterations_per_epoch} iterations so that {MIN_EPOCHS} fit"
            )

    def run_training(self) -> None:
        self.on_train_start()
        start, epoch_seconds, stopped_mid_epoch = time.time(), [], False
        while self.current_epoch < self.num_epochs and time.time() < self.deadline:
            began = time.time()
            self.on_epoch_start()
            self.on_train_epoch_start()
            train_outputs = []
            while len(train_outputs) < self.num_iterations_per_epoch:  # fit_epoch_length may lower it
                if time.time() >= self.deadline:
                    stopped_mid_epoch = True
                    break
                train_outputs.append(self.train_step(next(self.dataloader_train)))
                if self.current_epoch == 0 and len(train_outputs) == PROBE_ITERATIONS:
                    self.fit_epoch_length(time.time() - began, PROBE_ITERATIONS, self.deadline - began)
            if stopped_mid_epoch:
                break
            self.on_train_epoch_end(train_outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                val_batches = (next(self.dataloader_val) for _ in range(self.num_val_iterations_per_epoch))
                val_outputs = [self.validation_step(batch) for batch in val_batches]
                self.on_validation_epoch_end(val_outputs)
            self.on_epoch_end()  # increments current_epoch
            epoch_seconds.append(time.time() - began)
            self.replan_epochs(epoch_seconds)
            left = self.deadline - time.time()
            self.print_to_log_file(f"budget: {left:.0f} s left, planned epochs {self.num_epochs}")
        summary = {
            "epochs": self.current_epoch,
            "stopped_mid_epoch": stopped_mid_epoch,
            "train_seconds": time.time() - start,
            "epoch_seconds": epoch_seconds,
            "iterations_per_epoch": self.num_iterations_per_epoch,
            "batch_size": self.batch_size,
            "patch_size": list(self.configuration_manager.patch_size),
        }
        with open(join(self.output_folder, "budget.json"), "w") as f:
            json.dump(summary, f, indent=1)
        self.current_epoch = max(self.current_epoch, 1)  # on_train_end saves as current_epoch - 1
        self.on_train_end()

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        self.print_to_log_file("budget trainer: validation skipped (nnunet.py predicts with nnUNetv2_predict)")
