"""Checkpoints as files: loading them (weights_only by default), a run's best one, and whether two were written for
the same model and data. FP32 weights whatever precision trained them."""

import pickle
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

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


# ModelCheckpoint's name for a checkpoint scored by val/dice (conf/callbacks/default.yaml:
# "epoch{epoch:03d}-dice{val/dice:.4f}"). recovery.ckpt, interrupted.ckpt, last.ckpt and hpc_ckpt_<n>.ckpt are
# points to resume from, never the best.
SCORED_NAME = re.compile(r"epoch(\d+)-dice(\d+(?:\.\d+)?)\.ckpt")


def best_checkpoint(run_dir: str | Path) -> Path:
    """The run's best checkpoint: of the files in `<run_dir>/checkpoints` named with their val/dice
    (`epoch012-dice0.8753.ckpt`), the highest Dice (the later epoch on a tie); else `last.ckpt`.

    Raises:
        CheckpointError: the folder holds neither (it names the folder and what it holds).
    """
    folder = Path(run_dir) / "checkpoints"
    scored = [
        (float(m.group(2)), int(m.group(1)), p) for p in folder.glob("*.ckpt") if (m := SCORED_NAME.fullmatch(p.name))
    ]
    if scored:
        return max(scored)[2]
    if (folder / "last.ckpt").is_file():
        return folder / "last.ckpt"
    held = ", ".join(sorted(p.name for p in folder.glob("*.ckpt"))) or "nothing"
    raise CheckpointError(f"{folder}: no best checkpoint (epoch<N>-dice<score>.ckpt) nor last.ckpt (holds {held})")


def differences(
    first: dict[str, Any], second: dict[str, Any], keys: Iterable[str] | None = None
) -> list[tuple[str, Any, Any]]:
    """`(key, first value, second value)` for every key whose value differs between two checkpoints'
    `hyper_parameters.inference` dicts: all keys, nested dicts flattened (`net.channels`), or only `keys`
    (dotted for nested ones: `net.in_channels`). One comparison for resuming (all of it must match) and for
    ensembles (only what the preprocessing and the labels depend on)."""

    def flat(info: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out = {}
        for key, value in info.items():
            out |= flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
        return out

    a, b = flat(first), flat(second)
    return [
        (key, a.get(key), b.get(key)) for key in (sorted(a | b) if keys is None else keys) if a.get(key) != b.get(key)
    ]
