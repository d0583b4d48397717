"""Export an FP32 model from a `+precision=mixed` checkpoint: the FP32 masters, not the rounded FP16/BF16 weights.

python -m medseg.precision.export CKPT OUT
"""

import argparse
from pathlib import Path

import torch

from medseg.precision.plugin import saved_state


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


def export_fp32(ckpt_path: str | Path, out_path: str | Path) -> Path:
    """Write ``{"state_dict": FP32 tensors, "hyper_parameters": ...}`` built from a ``+precision=mixed`` checkpoint."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if saved_state(ckpt) is None:
        raise ValueError(f"{ckpt_path} holds no FP32 masters (was it trained with +precision=mixed?)")
    state_dict = fp32_state_dict(ckpt)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state_dict, "hyper_parameters": ckpt.get("hyper_parameters")}, out_path)
    return out_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", type=Path, help="Lightning checkpoint written by a +precision=mixed run")
    parser.add_argument("out", type=Path, help="where to write the FP32 weights")
    args = parser.parse_args(argv)
    print(export_fp32(args.ckpt, args.out))


if __name__ == "__main__":
    main()
