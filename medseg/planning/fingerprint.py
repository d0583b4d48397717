"""A dataset fingerprint: what the planner needs to know about an MSD folder, read once.

Geometry comes from every header (fast); intensities from foreground voxels of a sample of cases.
"""

import json
from dataclasses import dataclass
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
    spacings, shapes: (N, 3) voxel spacing (mm) and shape of every case, RAS axis order.
    intensity: per channel, statistics of foreground voxels (label > 0): mean, std, p00_5, p99_5.
    """

    root: Path
    modalities: list[str]
    num_classes: int
    num_cases: int
    spacings: np.ndarray
    shapes: np.ndarray
    intensity: list[dict[str, float]]

    @property
    def is_ct(self) -> bool:
        return all(m.upper() == "CT" for m in self.modalities)

    def resampled_shapes(self, spacing: np.ndarray) -> np.ndarray:
        """(N, 3) shapes after resampling every case to `spacing`."""
        return self.shapes * self.spacings / np.asarray(spacing)


def _foreground_sample(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """(n', C) intensities of up to `n` foreground voxels; `image` (X, Y, Z) or (X, Y, Z, C) channels-last."""
    image = image.reshape(*label.shape, -1)
    idx = np.flatnonzero(label.reshape(-1) > 0)
    if idx.size > n:
        idx = rng.choice(idx, n, replace=False)
    return image.reshape(-1, image.shape[-1])[idx]


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
    samples = []
    for i in picked:
        label = np.asanyarray(nib.load(items[i]["label"]).dataobj)
        image = np.asarray(nib.load(items[i]["image"]).dataobj, dtype=np.float32)
        samples.append(_foreground_sample(image, label, rng, voxels_per_case))
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
    return Fingerprint(root, modalities, len(meta["labels"]), len(items), spacings, shapes, intensity)
