"""The master-weight plugin's entry in a checkpoint, read without the plugin: its FP32 masters, its precision plan,
and checkpoints written under its old name.

Lightning saves a precision plugin's ``state_dict()`` under the plugin's class name (``STATE_KEY``, the class name
of ``medseg.precision.plugin.MasterWeightPrecision``): ``{"dtype": str, "scaler": dict, "masters": [[FP32 tensor]],
"names": [[str]], "plan": dict, "advisor": dict}``, one list per optimizer. A leaf (no medseg imports, no
Lightning): ``medseg.checkpoint``, inference and the FP32 export read checkpoints through it.
"""

from typing import Any

import torch

STATE_KEY = "MasterWeightPrecision"
# The plugin was called MixedPrecision, like Lightning's AMP plugin, until it was renamed, so older checkpoints
# hold its state under that key.
LEGACY_STATE_KEY = "MixedPrecision"


def saved_state(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The plugin's state in a checkpoint (under its name, or the legacy key when that entry has masters)."""
    state = checkpoint.get(STATE_KEY) or checkpoint.get(LEGACY_STATE_KEY) or {}
    return state if "masters" in state else None


def move_legacy_state(checkpoint: dict[str, Any], key: str = STATE_KEY) -> None:
    """Checkpoints written before the rename keep the plugin's state under ``MixedPrecision``, which is also the
    key of Lightning's AMP plugin (``16-mixed``): move ours to ``key`` (the running plugin's class name) in place,
    and refuse the AMP one (GradScaler state, no masters) with a message that says so."""
    old = checkpoint.get(LEGACY_STATE_KEY)
    if old is None or key in checkpoint:
        return
    if "masters" not in old:
        raise ValueError(
            f"This checkpoint's {LEGACY_STATE_KEY!r} entry has no FP32 masters (keys: {sorted(old)}): it was"
            " written by Lightning's precision='16-mixed'/'bf16-mixed' (AMP), not by +precision=mixed. Resume it"
            " with +precision=amp, or start a new +precision=mixed run from its weights."
        )
    checkpoint[key] = checkpoint.pop(LEGACY_STATE_KEY)


def fp32_state_dict(ckpt: dict) -> dict[str, torch.Tensor]:
    """The checkpoint's ``state_dict`` in FP32: parameters take their FP32 master from the plugin state
    (``MasterWeightPrecision``'s entry, matched by name) where there is one; every other floating entry (e.g.
    BatchNorm running statistics, or weights of a run without the plugin) is cast to float32."""
    plugin_state = saved_state(ckpt) or {}
    state_dict = dict(ckpt["state_dict"])
    for names, masters in zip(plugin_state.get("names", []), plugin_state.get("masters", []), strict=True):
        for name, master in zip(names, masters, strict=True):
            if name not in state_dict:
                raise KeyError(f"master for parameter {name!r} has no entry in the checkpoint's state_dict")
            state_dict[name] = master
    return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
