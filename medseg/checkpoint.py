"""Loading checkpoints for inference: weights_only by default, FP32 weights whatever precision trained them."""

import pickle
import re
from pathlib import Path

import torch

from medseg.precision.state import fp32_state_dict


class CheckpointError(RuntimeError):
    """A checkpoint could not be read; the message names the file and why."""


class UnreadableCheckpointError(CheckpointError):
    """The file is damaged (truncated, cut short by a crash or a full disk), as opposed to complete but refused."""


def load_checkpoint(path: str | Path, allow_unsafe: bool = False) -> dict:
    """Read a Lightning checkpoint with `torch.load(weights_only=True)`.

    A file that needs full unpickling (it could run code) is refused unless `allow_unsafe`; a truncated or
    non-checkpoint file gets a CheckpointError naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not allow_unsafe:
            found = re.search(r"GLOBAL (\S+)", str(err))
            what = f"a pickled {found.group(1)}" if found else "pickled objects"
            raise CheckpointError(
                f"{path}: refusing to unpickle {what}, which could run code when loaded (only tensors and plain "
                "containers are loaded by default). If you made this file yourself, pass allow_unsafe_checkpoint=true."
            ) from None
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError) as err:
        raise UnreadableCheckpointError(f"{path}: not a readable checkpoint (truncated or corrupted?): {err}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no state_dict)")
    if "inference" not in (ckpt.get("hyper_parameters") or {}):
        raise CheckpointError(f"{path}: not a medseg checkpoint (no hyper_parameters.inference)")
    return ckpt


def fp32_net_state(ckpt: dict) -> dict[str, torch.Tensor]:
    """The network's weights in FP32: the plugin's FP32 masters where the checkpoint has them (a `mixed` run
    saves FP16/BF16 weights in `state_dict`), else the saved weights cast to float32."""
    state = fp32_state_dict(ckpt)
    return {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
