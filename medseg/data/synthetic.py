"""A small synthetic MSD-layout dataset: organ-like ellipsoids with tumour-like lesions in noisy MRI-like volumes.

It is the default dataset, so a fresh clone trains with no download; tests use it too. Everything is drawn from
one seed, so the same call writes byte-identical volumes.
"""

import json
from pathlib import Path

import nibabel as nib
import numpy as np

LABELS = {"0": "background", "1": "organ", "2": "tumour"}

# Voxel-to-world matrices the cases cycle through: RAS, LPS and a permuted one, so orientation handling is
# exercised by the default data and not only by real scans.
_ORIENTATIONS = [
    np.diag([1.0, 1.0, 1.0]),
    np.diag([-1.0, -1.0, 1.0]),
    np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1.0]]),
]


def _ellipsoid(shape: tuple[int, int, int], centre: np.ndarray, radii: np.ndarray, rot: np.ndarray) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1) - centre
    local = grid @ rot
    return ((local / radii) ** 2).sum(-1) <= 1.0


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def make_case(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One volume and its label.

    Returns:
        image: float32 (X, Y, Z), positive MRI-like intensities with a smooth bias field and noise.
        label: uint8 (X, Y, Z), 0 background, 1 organ, 2 tumour (inside the organ).
    """
    size = np.array(shape, dtype=float)
    centre = size / 2 + rng.uniform(-0.1, 0.1, 3) * size
    radii = rng.uniform(0.22, 0.32, 3) * size.min()
    rot = _random_rotation(rng)
    organ = _ellipsoid(shape, centre, radii, rot)

    # The lesion sits inside the organ, at most halfway to its boundary, so it never leaves it.
    offset = rot @ (rng.uniform(-0.4, 0.4, 3) * radii)
    tumour_radii = rng.uniform(0.4, 0.55, 3) * radii.min()
    tumour = _ellipsoid(shape, centre + offset, tumour_radii, _random_rotation(rng)) & organ

    label = np.zeros(shape, np.uint8)
    label[organ] = 1
    label[tumour] = 2

    body = _ellipsoid(shape, size / 2, size * 0.47, np.eye(3))
    xs = [np.linspace(-1, 1, s) for s in shape]
    bias = 1 + 0.15 * np.add.outer(np.add.outer(xs[0], xs[1]), xs[2]) * rng.uniform(-1, 1)
    image = np.where(body, 60.0, 0.0)
    image[organ] = rng.uniform(110, 130)
    image[tumour] = rng.uniform(175, 200)
    image = image * bias + rng.normal(0, 12, shape)
    image[~body] = np.abs(image[~body]) * 0.1
    return image.astype(np.float32), label


def write_synthetic_dataset(
    root: str | Path,
    num_cases: int = 24,
    seed: int = 0,
    min_size: int = 44,
    max_size: int = 60,
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0),
) -> Path:
    """Write `num_cases` cases to `root` in MSD layout (dataset.json, imagesTr/, labelsTr/) and return root.

    Case shapes vary in [min_size, max_size] per axis and spacings vary by up to 20% around `spacing`, so
    resampling and padding are exercised.
    """
    root = Path(root)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    training = []
    for i in range(num_cases):
        shape = tuple(int(s) for s in rng.integers(min_size, max_size + 1, 3))
        image, label = make_case(rng, shape)
        zooms = np.asarray(spacing) * rng.uniform(0.8, 1.2, 3)
        affine = np.eye(4)
        affine[:3, :3] = _ORIENTATIONS[i % len(_ORIENTATIONS)] * zooms
        affine[:3, 3] = rng.uniform(-50, 50, 3)
        name = f"synthetic_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / name)
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {
        "name": "Synthetic",
        "description": "medseg synthetic organs with lesions (medseg.data.synthetic)",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": LABELS,
        "numTraining": num_cases,
        "numTest": 0,
        "training": training,
        "test": [],
        "seed": seed,
    }
    # dataset.json is written last: its presence marks a complete dataset (see MSDDataModule).
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root
