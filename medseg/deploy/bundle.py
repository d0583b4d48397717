"""A MONAI bundle of a trained model (configs/metadata.json, configs/inference.json, models/model.ts, scripts/)
that predicts as `medseg.predict dtype=fp32` does, where only torch, MONAI and nibabel are installed:

    python -m monai.bundle run --bundle_root B --config_file B/configs/inference.json
        --meta_file B/configs/metadata.json --dataset_dir <folder of .nii.gz> --output_dir <folder>

inference.json spells out `medseg.data.transforms.preprocess` as MONAI transforms (tests/test_export.py checks
that both give the same tensors), runs `scripts/runtime.py` (a copy of `medseg.deploy.bundle_runtime`), takes the
argmax, inverts the preprocessing onto the input's grid, keeps the largest components the test pass chose and
writes one uint8 NIfTI mask per image, named as the image.
"""

import json
import shutil
import tempfile
from pathlib import Path

import monai
import nibabel
import numpy as np
import torch

from medseg.deploy import bundle_runtime
from medseg.deploy.onnx_model import to_onnx
from medseg.deploy.torchscript import LowPrecisionNet, to_torchscript
from medseg.deploy.trained import TrainedModel
from medseg.precision.dtypes import DTYPES

SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
INFERER = "scripts.runtime.MirroredSlidingWindowInferer"


def preprocessing(model: TrainedModel) -> list[dict]:
    """`medseg.data.transforms.preprocess(..., with_label=False)` as bundle config: load, channels first, RAS,
    target spacing, crop to the nonzero region, normalise (CT window or nonzero z-score), pad to a patch."""
    info = model.info
    if info["modality"].upper() == "CT":
        lo, hi = info["ct_window"]
        normalise = {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": lo, "a_max": hi, "b_min": 0.0,
                     "b_max": 1.0, "clip": True}  # fmt: skip
    else:
        normalise = {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True}
    return [
        {"_target_": "LoadImaged", "keys": "image", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": "image", "pixdim": "@spacing", "mode": "bilinear", "dtype": "$torch.float32"},
        # x != 0 (raw zeros are outside the body), picklable for DataLoader workers
        {
            "_target_": "CropForegroundd",
            "keys": "image",
            "source_key": "image",
            "select_fn": "$functools.partial(operator.ne, 0)",
            "allow_smaller": True,
            "start_coord_key": None,
            "end_coord_key": None,
        },  # fmt: skip
        normalise,
        {"_target_": "SpatialPadd", "keys": "image", "spatial_size": "@patch_size"},
        {"_target_": "EnsureTyped", "keys": "image", "track_meta": True},
    ]


def postprocessing(model: TrainedModel) -> list[dict]:
    """Argmax, inversion onto the input's grid (nearest), keep-largest where chosen, a uint8 mask per image."""
    steps = [
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        {
            "_target_": "Invertd",
            "keys": "pred",
            "transform": "@preprocessing",
            "orig_keys": "image",
            "nearest_interp": True,
            "to_tensor": True,
        },  # fmt: skip
    ]
    if model.keep_largest:
        steps.append({"_target_": "KeepLargestConnectedComponentd", "keys": "pred", "applied_labels": "@keep_largest",
                      "is_onehot": False, "independent": True})  # fmt: skip
    steps.append({"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "",
                  "output_ext": ".nii.gz", "output_dtype": "$np.uint8", "resample": False, "separate_folder": False,
                  "print_log": False})  # fmt: skip
    return steps


NETWORKS = {  # how inference.json loads each format's net file
    "torchscript": "$torch.jit.load(@bundle_root + '/models/model.ts', map_location=@device)",
    "onnx": {"_target_": "scripts.runtime.OnnxNetwork", "path": "$@bundle_root + '/models/model.onnx'"},
}
DEVICES = {
    "torchscript": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
    "onnx": "$torch.device('cpu')",  # ONNX Runtime's CPU execution provider
}


def inference_config(model: TrainedModel, network: str = "torchscript") -> dict:
    """configs/inference.json for a `network` of "torchscript" (models/model.ts) or "onnx" (models/model.onnx):
    the settings first (each overridable with `--name value`), then the components."""
    return {
        "imports": ["$import functools", "$import glob", "$import operator", "$import numpy as np", "$import torch"],
        "bundle_root": ".",
        "dataset_dir": "$@bundle_root + '/data'",
        "output_dir": "$@bundle_root + '/eval'",
        "device": DEVICES[network],
        "spacing": list(model.info["spacing"]),
        "patch_size": list(model.info["patch_size"]),
        "mirror_axes": model.mirror_axes,
        "keep_largest": model.keep_largest,
        "sw_batch_size": model.sw_batch_size,
        "overlap": model.overlap,
        "num_workers": 2,
        "datalist": "$sorted(glob.glob(@dataset_dir + '/*.nii.gz') + glob.glob(@dataset_dir + '/*.nii'))",
        "network_def": NETWORKS[network],
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing(model)},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': f} for f in @datalist]", "transform": "@preprocessing"},
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": "@num_workers",
        },  # fmt: skip
        "inferer": {
            "_target_": INFERER,
            "roi_size": "@patch_size",
            "sw_batch_size": "@sw_batch_size",
            "overlap": "@overlap",
            "mode": "gaussian",
            "mirror_axes": "@mirror_axes",
        },  # fmt: skip
        "postprocessing": {"_target_": "Compose", "transforms": postprocessing(model)},
        # a plain loop (scripts/runtime.py), not MONAI's SupervisedEvaluator, which needs pytorch-ignite
        "run": [
            {
                "_target_": "scripts.runtime.predict_all",
                "dataloader": "@dataloader",
                "network": "@network",
                "inferer": "@inferer",
                "postprocessing": "@postprocessing",
                "device": "@device",
            }
        ],  # fmt: skip
    }


def metadata(model: TrainedModel, exported_as: str) -> dict:
    """configs/metadata.json: the bundle specification's required keys, the net's input and output, and what
    medseg applies around the net (`medseg`). `exported_as`: "script", "trace" (TorchScript) or "onnx"."""
    info, names = model.info, model.label_names
    modality = "CT" if info["modality"].upper() == "CT" else "MR"
    patch = list(info["patch_size"])
    kept = [names[i] for i in model.keep_largest]
    return {
        "schema": SCHEMA,
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by medseg from {model.path.name}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"nibabel": nibabel.__version__},
        "optional_packages_version": {"fire": "any (for the monai.bundle command line)"},
        "name": f"medseg {info['net']['_target_'].rsplit('.', 1)[-1]} segmentation of {', '.join(names[1:])}",
        "task": f"3D segmentation of {', '.join(names[1:])}",
        "description": (
            f"A {info['net']['_target_']} trained with medseg; preprocessing, sliding-window inference "
            f"(mirroring over axes {model.mirror_axes}), inversion onto the input grid and keep-largest-component "
            f"postprocessing ({kept or 'none'}) as medseg.predict applies them."
        ),
        "authors": "medseg",
        "copyright": "the model's trainer; see the training data's licence",
        "data_source": "see the training run",
        "data_type": "nibabel",
        "image_classes": f"{model.in_channels} channel(s) {info['modality']}, resampled to {info['spacing']} mm",
        "label_classes": ", ".join(f"{i}: {n}" for i, n in enumerate(names)),
        "pred_classes": f"one uint8 mask of class indices ({', '.join(f'{i}: {n}' for i, n in enumerate(names))})",
        "intended_use": "research only, not for clinical use",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": modality,
                    "num_channels": model.in_channels,
                    "spatial_shape": patch,
                    "dtype": "float32",
                    "value_range": [0, 1] if modality == "CT" else [],
                    "is_patch_data": True,
                    "channel_def": {str(i): f"{info['modality']} channel {i}" for i in range(model.in_channels)},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": len(names),
                    "spatial_shape": patch,
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": {str(i): n for i, n in enumerate(names)},
                }
            },
        },
        "medseg": {
            "checkpoint": model.path.name,
            "exported_as": exported_as,
            "spacing": list(info["spacing"]),
            "modality": info["modality"],
            "ct_window": list(info["ct_window"]),
            "mirror_axes": model.mirror_axes,
            "keep_largest": kept,
            "label_names": names,
        },
    }


def write_bundle(
    model: TrainedModel,
    out: Path,
    overwrite: bool = False,
    network: str = "torchscript",
    opset: int | None = None,
    dtype: str = "fp32",
) -> Path:
    """Write the bundle folder `out` whole or not at all (built beside it, then renamed). Returns `out`.
    `network`: "torchscript" (models/model.ts) or "onnx" (models/model.onnx, run by ONNX Runtime; `opset`).
    `dtype`: "fp32", or "bf16"/"fp16" for a TorchScript net computing in that dtype (`LowPrecisionNet`; on a CPU,
    BF16 is what `medseg.predict` uses by default: benchmarks/RESULTS.md, "Export (bundle, ONNX)")."""
    if dtype not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"--dtype must be fp32, bf16 or fp16, got {dtype!r}")
    if dtype != "fp32" and network != "torchscript":
        raise ValueError(f"--dtype {dtype} is for --format bundle (TorchScript); the ONNX export is FP32")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out}: a folder that is not empty; choose another or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".partial-{out.name}-", dir=out.parent))
    try:
        for sub in ("configs", "models", "scripts"):
            (tmp / sub).mkdir()
        if network == "onnx":
            to_onnx(model.net, model.example_input(batch=2), tmp / "models" / "model.onnx", opset)
            how = "onnx"
        else:
            net = model.net if dtype == "fp32" else LowPrecisionNet(model.net, DTYPES[dtype], model.fp32_modules)
            module, how = to_torchscript(net, model.example_input(batch=2))
            how = how if dtype == "fp32" else f"{how} ({dtype})"
            torch.jit.save(module, str(tmp / "models" / "model.ts"))
        (tmp / "configs" / "metadata.json").write_text(json.dumps(metadata(model, how), indent=2) + "\n")
        (tmp / "configs" / "inference.json").write_text(json.dumps(inference_config(model, network), indent=2) + "\n")
        (tmp / "scripts" / "__init__.py").write_text("")
        shutil.copyfile(bundle_runtime.__file__, tmp / "scripts" / "runtime.py")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
