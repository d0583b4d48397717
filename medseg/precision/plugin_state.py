"""The master-weight plugin's checkpoint state: what ``MasterWeightPrecision`` saves (FP32 masters, scaler, precision
plan, advisor counts), how it is restored exactly on resume, and checkpoints written under the plugin's old name.

A mixin of the plugin on top of ``medseg.precision.promotion`` (restoring a plan promotes its modules again); code
that only reads a saved checkpoint uses the leaf ``medseg.precision.state`` instead.
"""

import logging
from typing import Any

import torch

from medseg.precision.masters import copy_to_model
from medseg.precision.promotion import Promotion
from medseg.precision.state import move_legacy_state

log = logging.getLogger("medseg.precision.plugin")  # the plugin's messages, under the plugin's logger


class CheckpointState(Promotion):
    """``state_dict``/``load_state_dict``/``on_load_checkpoint`` of ``MasterWeightPrecision`` (Lightning's
    ``Precision`` hooks of those names). Restoring the saved plan re-promotes modules: ``Promotion._resume_plan``."""

    _pending_state: dict[str, Any] | None

    def state_dict(self) -> dict[str, Any]:
        """``{"dtype": str, "scaler": dict, "masters": [[FP32 tensor]], "names": [[str]]}``, a list per opt.

        Only tensors, numbers, strings, lists and dicts, so checkpoints load with ``weights_only=True``.
        ``names`` are the parameters' names in the LightningModule (the checkpoint's ``state_dict`` keys).
        """
        state = {
            "dtype": self.dtype_name,
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "masters": [[m.detach() for m in entry.master_params] for _, entry in self._masters],
            "names": [list(entry.names) for _, entry in self._masters],
            "plan": self.precision_plan.to_dict(),
        }
        if self.advisor is not None:
            state["advisor"] = self.advisor.state_dict()
        return state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints written before the rename keep this plugin's state under its old class name,
        ``MixedPrecision`` (also the key of Lightning's AMP plugin): ``medseg.precision.state.move_legacy_state``."""
        move_legacy_state(checkpoint, type(self).__qualname__)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the scaler and copy the saved masters into the current ones (exact FP32)."""
        if self._dtype is None or (state_dict["masters"] and not self._masters):
            self._pending_state = state_dict  # connect() applies it once the masters exist
            return
        assert self.scaler is not None
        if state_dict["dtype"] == self.dtype_name:
            self.scaler.load_state_dict(state_dict["scaler"])
        else:
            log.warning(
                "MasterWeightPrecision: checkpoint trained in %s, now %s: loading the FP32 masters, not the scaler",
                state_dict["dtype"],
                self.dtype_name,
            )
        if len(state_dict["masters"]) != len(self._masters):
            n_saved, n_run = len(state_dict["masters"]), len(self._masters)
            raise ValueError(f"Checkpoint has masters for {n_saved} optimizers, the run has {n_run}")
        self._resume_plan(state_dict)
        saved_names = state_dict.get("names", [None] * len(self._masters))
        for (_, entry), saved, names in zip(self._masters, state_dict["masters"], saved_names, strict=True):
            if names is not None and list(names) != entry.names:
                raise ValueError("Checkpoint masters belong to other parameters than this optimizer's.")
            if len(saved) != len(entry.master_params):
                n_run = len(entry.master_params)
                raise ValueError(f"Checkpoint has {len(saved)} masters, the optimizer {n_run} parameters.")
            with torch.no_grad():
                torch._foreach_copy_(entry.master_params, list(saved))
            copy_to_model(entry)  # the model must hold the rounded masters, exactly as after a step
