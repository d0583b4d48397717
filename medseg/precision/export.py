"""Export an FP32 model from a `+precision=mixed` checkpoint: the FP32 masters, not the rounded FP16/BF16 weights.

python -m medseg.precision.export CKPT OUT
"""

import argparse
from pathlib import Path

import torch

from medseg.precision.state import fp32_state_dict, saved_state


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
