"""Exported nets against medseg's own: seconds per case for PyTorch fp32 / bf16 (`medseg.predict`'s Predictor),
TorchScript and ONNX Runtime (what a `medseg.export` bundle runs), side by side on the same preprocessed cases.

    python benchmarks/export.py --ckpt RUN --images DIR [--cases 10] [--repeat 3]

One timing = the mirrored sliding-window probabilities of one preprocessed case (the model's tested mirroring,
`medseg.predict`'s sw_batch_size and overlap), the part the backends change; reading, resampling and writing are the
same for all and left out. Per backend: the fastest of `--repeat` passes per case, summed over the cases / cases.
Each backend runs once on the first case untimed (warm-up). Also per backend: the largest probability
difference (max abs diff) from PyTorch fp32, and the share of voxels whose class differs.
Backends take turns case by case, so they share the machine's load.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from medseg.deploy.bundle_runtime import MirroredSlidingWindowInferer, OnnxNetwork
from medseg.deploy.onnx_model import to_onnx
from medseg.deploy.torchscript import LowPrecisionNet, to_torchscript
from medseg.deploy.trained import load_trained
from medseg.inference.ensemble import checkpoint_paths
from medseg.predict import Predictor, list_inputs
from medseg.tracking.tables import markdown_table


def backends(ckpt: str, folder: Path) -> dict:
    """name -> probs(image (1, C_in, X, Y, Z) float32) -> (1, C, X, Y, Z)."""
    model = load_trained(ckpt)
    example = model.example_input(batch=2)
    script, how = to_torchscript(model.net, example)
    script_bf16, how_bf16 = to_torchscript(LowPrecisionNet(model.net, torch.bfloat16, model.fp32_modules), example)
    onnx = OnnxNetwork(str(to_onnx(model.net, example, folder / "model.onnx")))
    inferer = MirroredSlidingWindowInferer(
        model.info["patch_size"], model.sw_batch_size, model.overlap, mirror_axes=model.mirror_axes
    )
    fp32, bf16 = (Predictor(ckpt, "cpu", model.sw_batch_size, model.overlap, dtype=d) for d in ("fp32", "bf16"))
    return {
        "pytorch fp32": fp32.probs,
        "pytorch bf16": bf16.probs,
        f"torchscript ({how})": lambda image: inferer(image, script),
        f"torchscript bf16 ({how_bf16}; `--dtype bf16`)": lambda image: inferer(image, script_bf16),
        "onnxruntime": lambda image: inferer(image, onnx),
    }, fp32.preprocess


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="a run folder or checkpoint")
    parser.add_argument("--images", type=Path, required=True, help="a folder of .nii.gz images")
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    [ckpt] = checkpoint_paths(args.ckpt)
    with tempfile.TemporaryDirectory() as tmp:
        runs, preprocess = backends(str(ckpt), Path(tmp))
        seconds = {name: 0.0 for name in runs}
        diff = {name: 0.0 for name in runs}
        changed = {name: 0.0 for name in runs}
        cases = list_inputs(args.images)[: args.cases]
        warm = preprocess({"image": str(cases[0])})["image"].as_tensor()[None]
        for probs in runs.values():  # first calls build kernels and (TorchScript) optimise the graph
            probs(warm)
        for path in cases:
            image = preprocess({"image": str(path)})["image"].as_tensor()[None]
            reference = runs["pytorch fp32"](image).float()
            for name, probs in runs.items():
                times = []
                for _ in range(args.repeat):
                    start = time.perf_counter()
                    out = probs(image)
                    times.append(time.perf_counter() - start)
                seconds[name] += min(times)
                diff[name] = max(diff[name], (out.float() - reference).abs().max().item())
                changed[name] += (out.argmax(1) != reference.argmax(1)).float().mean().item() / len(cases)
    rows = [
        {"backend": n, "s/case": seconds[n] / len(cases), "max abs diff": diff[n], "voxels changed": changed[n]}
        for n in runs
    ]
    print(f"{len(cases)} case(s) of {args.images}, {ckpt.name}, {torch.get_num_threads()} threads")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
