"""The trained nets of a run (or an ensemble of fold runs) with the preprocessing they were trained with, predicting
whole cases on their own voxel grid: shared by `medseg.predict` (files and folders) and `medseg.report` (a
validation case)."""

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from monai.data import MetaTensor
from monai.transforms import Invertd

from medseg.checkpoint import CheckpointError, fp32_net_state, load_checkpoint
from medseg.data.transforms import preprocess
from medseg.inference import postprocess
from medseg.inference.ensemble import check_compatible, checkpoint_paths
from medseg.inference.label_inversion import invert_labels
from medseg.inference.slab_stitching import SlabStitcher, live_shape
from medseg.inference.stitch_device import stitch_device, window_batch
from medseg.models.sliding_window import mirror_flips
from medseg.precision.convert import convert_net
from medseg.precision.dtypes import accumulation_dtype, inference_dtype
from medseg.precision.precision_plan import PrecisionPlanError, saved_fp32_modules

log = logging.getLogger(__name__)
# Probability channels resampled back to the input's grid at a time (float32 while resampled).
INVERT_CHANNELS = 8


class Predictor:
    """Trained networks (one, or an ensemble averaging their softmax) plus the preprocessing they were trained
    with, from medseg checkpoints.

    Args:
        ckpt_path: a checkpoint, a list of them, a run folder or a folder of fold runs
            (`medseg.inference.ensemble.checkpoint_paths`).
        device: `cpu`, `cuda[:N]` or `auto` (CUDA when available).
        dtype: `fp32`, `bf16`, `fp16` or `auto` (fp16 on CUDA, bf16 on CPU): the nets are converted as the
            training plugin converts them, with the precision plan saved in each checkpoint (its FP32 modules stay
            FP32); windows use that dtype.
        sum_dtype: the stitching sums and probabilities: `fp32`, `bf16`, `fp16` or `auto` (fp16 for bf16
            windows, else the windows' dtype; `medseg.precision.dtypes.accumulation_dtype`).
        mirror_axes: spatial axes whose flips are averaged; None: each model as it was tested after training.
        postprocessing: `auto` (the decision stored beside the checkpoint(s), none if there is none), `none`,
            or a decision file (`medseg.inference.postprocess`).
    """

    def __init__(
        self,
        ckpt_path: str | Sequence[str],
        device: str = "auto",
        sw_batch_size: int = 4,
        overlap: float = 0.5,
        allow_unsafe_checkpoint: bool = False,
        mirror_axes: Sequence[int] | None = None,
        dtype: str = "fp32",
        postprocessing: str = "none",
        sum_dtype: str = "auto",
    ) -> None:
        self.paths = checkpoint_paths(ckpt_path)
        ckpts = [load_checkpoint(p, allow_unsafe=allow_unsafe_checkpoint) for p in self.paths]
        infos = [c["hyper_parameters"]["inference"] for c in ckpts]
        check_compatible(infos, self.paths)
        info = infos[0]
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.dtype = inference_dtype(dtype, self.device)
        self.sum_dtype = accumulation_dtype(sum_dtype, self.dtype)
        self.nets, self.mirror_axes = [], []
        for path, ckpt, model_info in zip(self.paths, ckpts, infos, strict=True):
            net = instantiate(model_info["net"])
            net.load_state_dict(fp32_net_state(ckpt))  # the FP32 masters of a mixed run, then rounded once
            try:  # the modules its run kept in FP32 (configured, or promoted by the advisor) stay FP32
                self.nets.append(convert_net(net.to(self.device).eval(), self.dtype, saved_fp32_modules(ckpt)))
            except PrecisionPlanError as err:
                raise CheckpointError(f"{path}: {err}") from None
            # None: mirror as the model was tested after training
            axes = ckpt["hyper_parameters"].get("test_mirror_axes", ()) if mirror_axes is None else mirror_axes
            self.mirror_axes.append(list(axes))
        try:
            for axes in self.mirror_axes:
                mirror_flips(axes)  # before any image is read
        except ValueError as err:
            raise ValueError(f"mirror_axes: {err}") from None
        self.in_channels = int(info["net"]["in_channels"])
        self.label_names = list(info["label_names"])
        self.num_classes = len(info["label_names"])
        self.rois = [i["patch_size"] for i in infos]
        self.sw_batch_size = window_batch(sw_batch_size, self.num_classes, self.rois, self.dtype)
        self.overlap = overlap
        self.preprocess = preprocess(
            info["spacing"], info["modality"], info["patch_size"], info["ct_window"], with_label=False
        )
        self.invert_probs = Invertd("probs", transform=self.preprocess, orig_keys="image", nearest_interp=False)
        self.keep_largest = self._postprocessing(postprocessing, ckpt_path, info["label_names"])

    def _postprocessing(self, choice: str, ckpt_path, label_names: list[str]) -> list[int]:
        if choice == "none":
            return []
        if choice == "auto":
            folder = Path(ckpt_path) if isinstance(ckpt_path, str) and Path(ckpt_path).is_dir() else None
            record = postprocess.for_checkpoints(self.paths, folder)
        else:
            record = postprocess.load(Path(choice))
        if record is None:
            return []
        if record["label_names"] != list(label_names):
            raise ValueError(f"postprocessing: decided for labels {record['label_names']}, the model has {label_names}")
        names = [label_names[i] for i in record["keep_largest"]]
        log.info("postprocessing: keep the largest component of %s", names or "no class")
        return record["keep_largest"]

    def stitch(self, image: torch.Tensor, keep_probs: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Class indices (1, 1, X, Y, Z) of a preprocessed image (1, C_in, X, Y, Z) and, with `keep_probs`, its
        ensemble-mean probabilities (1, C, X, Y, Z) in `self.sum_dtype`, stitched slab by slab
        (`medseg.inference.slab_stitching`), on the stitching device (`inference.stitch_device`)."""
        image = image.to(self.device)
        stitcher = SlabStitcher(self.nets, self.rois, self.mirror_axes, self.sw_batch_size, self.overlap,
                                dtype=self.dtype, device=self._buffers(image, keep_probs),
                                sum_dtype=self.sum_dtype)  # fmt: skip
        return stitcher.labels_and_probs(image, keep_probs)

    def _buffers(self, image: torch.Tensor, keep_probs: bool) -> torch.device:
        shape = tuple(image.shape[2:]) if keep_probs else live_shape(image.shape[2:], self.rois, self.mirror_axes)
        return stitch_device(self.device, shape, self.num_classes, self.sum_dtype)

    def probs(self, image: torch.Tensor) -> torch.Tensor:
        """Ensemble-mean class probabilities (1, C, X, Y, Z) in `self.sum_dtype` of a preprocessed image (1, C_in, ...),
        on the stitching device."""
        probs = self.stitch(image, keep_probs=True)[1]
        assert probs is not None
        return probs

    def __call__(self, image_path: Path) -> np.ndarray:
        """uint8 mask (X, Y, Z) (int16 beyond 256 classes) on the input file's own voxel grid, postprocessed."""
        return self.predict_case(self.preprocess({"image": str(image_path)}))[0]

    def predict_case(self, data: dict, with_probs: bool = False) -> tuple[np.ndarray, torch.Tensor | None]:
        """uint8 mask (X, Y, Z) (int16 beyond 256 classes) on the input file's own voxel grid for a preprocessed
        case, postprocessed (`label_inversion.invert_labels`); with `with_probs` also its float16 probabilities
        (C, X, Y, Z) on that grid. `data["image"]` loses its voxels (`net_input`)."""
        x = net_input(data, self.dtype, self.device)
        record = data["image"]
        labels, probs = self.stitch(x, keep_probs=with_probs)
        del x
        mask = invert_labels(labels[0].cpu(), record, self.preprocess)
        del labels
        if self.keep_largest:
            mask = np.asarray(postprocess.keep_largest(mask[None], self.keep_largest)[0]).astype(mask.dtype)
        if probs is None:
            return mask, None
        return mask, self._invert_probs(probs[0], record)

    def _invert_probs(self, probs: torch.Tensor, record: MetaTensor) -> torch.Tensor:
        """float16 probabilities (C, X, Y, Z) on the input's grid from (C, ...) on the net's grid, a few channels
        at a time: float32 (Invertd's bilinear resampling) for those channels only, beside the float16 result."""
        out: torch.Tensor | None = None
        for start in range(0, probs.shape[0], INVERT_CHANNELS):
            part = probs[start : start + INVERT_CHANNELS].to("cpu", torch.float32)
            part = self.invert_probs({"image": record, "probs": self._with_record(part, record)})["probs"]
            if out is None:
                out = torch.empty((probs.shape[0], *part.shape[1:]), dtype=torch.float16)
            out[start : start + INVERT_CHANNELS] = part.as_tensor()
        assert out is not None
        return out

    @staticmethod
    def _with_record(tensor: torch.Tensor, record: MetaTensor) -> MetaTensor:
        return MetaTensor(tensor, meta=record.meta, applied_operations=record.applied_operations)


def net_input(data: dict, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The net's input (1, C_in, X, Y, Z) in `dtype` on `device` from a preprocessed `data["image"]` (C_in, X, Y, Z)
    float32 MetaTensor, which is replaced by a voxel-less MetaTensor with the same meta and applied_operations
    (all that Invertd reads of it).

    So a low-dtype prediction does not hold the FP32 image beside its copy while it stitches (at 512x512x256,
    256 MiB beside 128 MiB of BF16; benchmarks/RESULTS.md). The caller must hold no other reference to the image.
    """
    image = data.pop("image")
    # dtype first, then device: only the low-dtype copy goes to (and stays on) a GPU; no copy for fp32 on the CPU
    x = image.as_tensor().unsqueeze(0).to(dtype).to(device)
    data["image"] = MetaTensor(torch.empty(0), meta=image.meta, applied_operations=image.applied_operations)
    return x
