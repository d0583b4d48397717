"""A dataset fingerprint: what the planner needs to know about an MSD folder, read once.

Geometry comes from every header (fast); intensities and the nonzero region's extent from a sample of cases.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.data import load_decathlon_datalist

from medseg.config_check import ConfigError
from medseg.data.datamodule import header_geometry


@dataclass
class Fingerprint:
    """Args:
    root: the MSD folder.
    modalities: one name per channel, from dataset.json.
    num_classes: labels including background.
    num_cases: training cases listed in dataset.json.
    spacings, shapes: (N, 3) voxel spacing (mm) and shape of every case, RAS axis order, from the headers.
    intensity: per channel, statistics of foreground voxels (label > 0): mean, std, p00_5, p99_5.
    crop: (3,) median share of each axis that the nonzero region spans (the data module crops every image to
        it, as nnU-Net does: a brain MRI is ~60 % of its field of view per axis), from the sampled cases.
    """

    root: Path
    modalities: list[str]
    num_classes: int
    num_cases: int
    spacings: np.ndarray
    shapes: np.ndarray
    intensity: list[dict[str, float]]
    crop: np.ndarray = field(default_factory=lambda: np.ones(3))

    @property
    def is_ct(self) -> bool:
        return all(m.upper() == "CT" for m in self.modalities)

    def resampled_shapes(self, spacing: np.ndarray) -> np.ndarray:
        """(N, 3) shapes after resampling every case to `spacing` and cropping it to its nonzero region."""
        return self.shapes * self.crop * self.spacings / np.asarray(spacing)

    def largest_shape(self, spacing: np.ndarray) -> np.ndarray:
        """(3,) the largest image per axis after resampling, before cropping (what the data module checks a patch
        against)."""
        return (self.shapes * self.spacings / np.asarray(spacing)).max(axis=0)


def _foreground_sample(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """(n', C) intensities of up to `n` foreground voxels; `image` (X, Y, Z) or (X, Y, Z, C) channels-last."""
    image = image.reshape(*label.shape, -1)
    idx = np.flatnonzero(label.reshape(-1) > 0)
    if idx.size > n:
        idx = rng.choice(idx, n, replace=False)
    return image.reshape(-1, image.shape[-1])[idx]


def nonzero_share(image: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """(3,) share of each axis, RAS order, spanned by the bounding box of voxels nonzero in any channel (the region
    `medseg.data.transforms.preprocess` crops to); `image` (X, Y, Z) or (X, Y, Z, C)."""
    mask = image.reshape(*image.shape[:3], -1).any(axis=-1) if image.ndim > 3 else image != 0
    share = np.ones(3)
    if mask.any():
        for axis in range(3):
            hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
            share[axis] = (hit[-1] - hit[0] + 1) / mask.shape[axis]
    ras = np.empty(3)
    ras[nib.orientations.io_orientation(affine)[:, 0].astype(int)] = share
    return ras


def read_fingerprint(
    root: str | Path, max_cases: int = 30, voxels_per_case: int = 10_000, seed: int = 0
) -> Fingerprint:
    """Every header of `root`, and intensities of `voxels_per_case` foreground voxels from up to `max_cases`
    cases spread evenly over the list. A missing folder or dataset.json is a one-line ConfigError."""
    root = Path(root).expanduser()
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise ConfigError(f"plan: no dataset.json in {root}")
    meta = json.loads(meta_path.read_text())
    items = load_decathlon_datalist(meta_path, data_list_key="training", base_dir=root)
    if not items:
        raise ConfigError(f"plan: {meta_path} lists no training cases")
    spacings, shapes = header_geometry(item["image"] for item in items)
    rng = np.random.default_rng(seed)
    picked = np.unique(np.linspace(0, len(items) - 1, min(max_cases, len(items))).round().astype(int))
    samples, shares = [], []
    for i in picked:
        label = np.asanyarray(nib.load(items[i]["label"]).dataobj)
        img = nib.load(items[i]["image"])
        image = np.asarray(img.dataobj, dtype=np.float32)
        samples.append(_foreground_sample(image, label, rng, voxels_per_case))
        shares.append(nonzero_share(image, img.affine))
    voxels = np.concatenate(samples)
    if len(voxels) == 0:
        raise ConfigError(f"plan: no foreground voxels (label > 0) in the {len(picked)} cases read from {root}")
    intensity = [
        {
            "mean": float(v.mean()),
            "std": float(v.std()),
            "p00_5": float(np.percentile(v, 0.5)),
            "p99_5": float(np.percentile(v, 99.5)),
        }
        for v in voxels.T
    ]
    modalities = [meta["modality"][k] for k in sorted(meta["modality"], key=int)]
    crop = np.median(np.stack(shares), axis=0)
    return Fingerprint(root, modalities, len(meta["labels"]), len(items), spacings, shapes, intensity, crop)
