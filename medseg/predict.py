"""Inference: `python -m medseg.predict ckpt_path=<ckpt> input=<file or folder> output=<folder>`.

Each input NIfTI gets one uint8 mask of the same name in `output`, with the input's exact shape and affine:
the preprocessing (orientation, resampling, cropping, padding) is inverted with MONAI's `Invertd`.
"""

import logging
from collections.abc import Sequence
from pathlib import Path

import hydra
import nibabel as nib
import numpy as np
import torch
from hydra.utils import instantiate
from monai.data import MetaTensor
from monai.transforms import Invertd
from omegaconf import DictConfig

from medseg import CONF_DIR
from medseg.checkpoint import fp32_net_state, load_checkpoint
from medseg.data.transforms import preprocess
from medseg.models.inference import mirror_flips, sliding_window_probs

log = logging.getLogger(__name__)
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def list_inputs(input_path: Path) -> list[Path]:
    if input_path.is_file():
        return [input_path]
    if input_path.is_dir():
        files = sorted(p for p in input_path.iterdir() if p.name.endswith(NIFTI_SUFFIXES))
        if not files:
            raise FileNotFoundError(f"input={input_path}: no .nii/.nii.gz files in this folder")
        return files
    raise FileNotFoundError(f"input={input_path}: no such file or folder")


def check_output_folder(inputs: list[Path], output: Path) -> None:
    """Refuse an output folder that is, or lies inside, a folder holding inputs: masks would sit beside (or
    overwrite) the images they came from."""
    out = output.resolve()
    for folder in {p.resolve().parent for p in inputs}:
        if out == folder or folder in out.parents:
            raise ValueError(f"output={output} is inside the input folder {folder}; choose a folder outside it")


class Predictor:
    """A trained network plus the preprocessing it was trained with, from a medseg checkpoint."""

    def __init__(
        self,
        ckpt_path: str,
        device: str = "auto",
        sw_batch_size: int = 4,
        overlap: float = 0.5,
        allow_unsafe_checkpoint: bool = False,
        mirror_axes: Sequence[int] | None = None,
    ) -> None:
        ckpt = load_checkpoint(ckpt_path, allow_unsafe=allow_unsafe_checkpoint)
        info = ckpt["hyper_parameters"]["inference"]
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.net = instantiate(info["net"])
        self.net.load_state_dict(fp32_net_state(ckpt))
        self.net.to(self.device).eval()
        self.roi_size, self.sw_batch_size, self.overlap = info["patch_size"], sw_batch_size, overlap
        # None: mirror as the model was tested after training
        if mirror_axes is None:
            mirror_axes = ckpt["hyper_parameters"].get("test_mirror_axes", ())
        self.mirror_axes = list(mirror_axes)
        try:
            mirror_flips(self.mirror_axes)  # before any image is read
        except ValueError as err:
            raise ValueError(f"mirror_axes: {err}") from None
        self.preprocess = preprocess(
            info["spacing"], info["modality"], info["patch_size"], info["ct_window"], with_label=False
        )
        self.invert = Invertd("pred", transform=self.preprocess, orig_keys="image", nearest_interp=True)

    @torch.no_grad()
    def __call__(self, image_path: Path) -> np.ndarray:
        """uint8 mask (X, Y, Z) on the input file's own voxel grid."""
        data = self.preprocess({"image": str(image_path)})
        image = data["image"].unsqueeze(0).to(self.device)
        probs = sliding_window_probs(
            self.net, image, self.roi_size, self.sw_batch_size, self.overlap, mirror_axes=self.mirror_axes
        )
        pred = probs.argmax(1, keepdim=True)[0].float().cpu()
        # The prediction carries the image's record of applied transforms, which Invertd undoes in reverse.
        data["pred"] = MetaTensor(pred, meta=data["image"].meta, applied_operations=data["image"].applied_operations)
        data = self.invert(data)
        return np.asarray(data["pred"][0]).round().astype(np.uint8)


def predict(cfg: DictConfig) -> list[Path]:
    inputs = list_inputs(Path(cfg.input))
    output = Path(cfg.output)
    check_output_folder(inputs, output)
    predictor = Predictor(
        cfg.ckpt_path, cfg.device, cfg.sw_batch_size, cfg.overlap, cfg.allow_unsafe_checkpoint, cfg.mirror_axes
    )
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for path in inputs:
        mask = predictor(path)
        source = nib.load(path)
        out = output / path.name
        nib.save(nib.Nifti1Image(mask, source.affine), out)
        log.info("%s -> %s %s", path, out, mask.shape)
        written.append(out)
    print(f"wrote {len(written)} mask(s) to {output}")
    return written


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
