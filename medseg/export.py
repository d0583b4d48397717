"""Export a trained model to run outside medseg.

python -m medseg.export <run folder or checkpoint> --format bundle --out <folder>   # MONAI bundle (TorchScript)
python -m medseg.export <run folder or checkpoint> --format onnx --out <folder>     # the same, net in ONNX
python -m medseg.export <run folder or checkpoint> --dtype bf16 --out <folder>      # TorchScript computing in BF16

A run folder exports its best checkpoint (as `medseg.predict` picks it); weights are the FP32 masters of a
`+precision=mixed` run. Preprocessing, mirroring and postprocessing are those `medseg.predict` applies by default.
Both formats write a MONAI bundle (medseg.deploy.bundle); with `onnx` its net is models/model.onnx, run by ONNX
Runtime on the CPU (needs `pip install -e .[export]`).
"""

import argparse
import logging
import sys
from pathlib import Path

from medseg.checkpoint import CheckpointError
from medseg.deploy.bundle import write_bundle
from medseg.deploy.trained import load_trained

FORMATS = ("bundle", "onnx")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m medseg.export", description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", help="a checkpoint, or a run folder (its best checkpoint)")
    parser.add_argument("--format", choices=FORMATS, default="bundle")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace a folder that is not empty")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="the TorchScript net's compute dtype (bf16: as medseg.predict runs on a CPU; fp16: on a GPU)",
    )
    parser.add_argument(
        "--allow-unsafe-checkpoint",
        action="store_true",
        help="unpickle a checkpoint that needs it (it can run code: only for checkpoints you made yourself)",
    )
    return parser.parse_args(argv)


def export(args: argparse.Namespace) -> Path:
    model = load_trained(args.ckpt, allow_unsafe=args.allow_unsafe_checkpoint)
    network = "onnx" if args.format == "onnx" else "torchscript"
    return write_bundle(model, args.out, overwrite=args.overwrite, network=network, opset=args.opset, dtype=args.dtype)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        out = export(args)
    except (CheckpointError, FileExistsError, ValueError) as error:
        print(f"medseg: {error}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {args.format} to {out}")


if __name__ == "__main__":
    main()
