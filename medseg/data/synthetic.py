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


def _organ_boxes(rng: np.random.Generator, shape: np.ndarray, num_organs: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(centre, radii) in voxels of `num_organs` ellipsoids spread through a trunk-like body: centres on a jittered
    grid along the long (last) axis, so organs overlap little however many there are."""
    per_axis = max(1, int(np.ceil(num_organs ** (1 / 3))))
    cells = np.stack(np.meshgrid(*[np.arange(per_axis)] * 3, indexing="ij"), -1).reshape(-1, 3)
    cells = cells[rng.permutation(len(cells))[:num_organs]]
    cell = shape * 0.6 / per_axis  # the organs fill the middle 60 % of the body's box
    centres = shape * 0.2 + (cells + 0.5 + rng.uniform(-0.2, 0.2, cells.shape)) * cell
    radii = np.maximum(cell * rng.uniform(0.25, 0.45, cells.shape), 1.0)
    return list(zip(centres, radii, strict=True))


def fixed_levels(num_classes: int) -> np.ndarray:
    """HU level of classes 1..num_classes-1 when a class keeps its level in every case: evenly spaced over
    100..3000 HU, above the body's -100..40, so that a net can learn which organ a voxel is from its intensity."""
    return np.linspace(100.0, 3000.0, num_classes - 1)


def make_ct_case(
    rng: np.random.Generator, shape: tuple[int, int, int], num_classes: int, levels: str = "random"
) -> tuple[np.ndarray, np.ndarray]:
    """One CT-like scan with `num_classes - 1` organ-like structures.

    Args:
        levels: "random": each organ at its own level drawn per case, in [-150, 300] (every tenth one bone-like,
            400..1200): memory and time benchmarks, where what a voxel is does not matter. "fixed": organ k at
            `fixed_levels`[k - 1] in every case, a task a net can learn (agreement of a trained many-class net).

    Returns:
        image: int16 (X, Y, Z) Hounsfield units: air -1000 outside an elliptic body of fat/soft tissue (-100..40),
            organs at their level, noise of 15 HU.
        label: uint8 (X, Y, Z) 0 background, 1..num_classes-1 one per organ (a later organ wins an overlap).
    """
    if not 2 <= num_classes <= 256:
        raise ValueError(f"num_classes must be in [2, 256] (uint8 labels), got {num_classes}")
    if levels not in ("random", "fixed"):
        raise ValueError(f"levels must be 'random' or 'fixed', got {levels!r}")
    table = fixed_levels(num_classes)
    size = np.asarray(shape, float)
    xs = [(np.arange(s) - s / 2) / (s * 0.47) for s in shape[:2]]
    body2d = xs[0][:, None] ** 2 + xs[1][None, :] ** 2 <= 1.0  # an elliptic trunk, the same on every slice
    image = rng.normal(0.0, 15.0, shape).astype(np.float32)
    image += np.where(body2d, np.float32(rng.uniform(-100, 40)), np.float32(-1000.0))[:, :, None]
    label = np.zeros(shape, np.uint8)
    for k, (centre, radii) in enumerate(_organ_boxes(rng, size, num_classes - 1), start=1):
        lo = np.maximum(np.floor(centre - radii), 0).astype(int)
        hi = np.minimum(np.ceil(centre + radii) + 1, size).astype(int)
        grid = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
        inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1.0
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        level = rng.uniform(400, 1200) if k % 10 == 0 else rng.uniform(-150, 300)
        level = table[k - 1] if levels == "fixed" else level  # drawn either way: "random" cases stay as they were
        label[box][inside] = k
        image[box][inside] = level + rng.normal(0.0, 15.0, int(inside.sum()))
    return np.clip(image, -1024, 3071).astype(np.int16), label


def write_ct_dataset(
    root: str | Path,
    num_cases: int = 6,
    num_classes: int = 118,
    shape: tuple[int, int, int] = (96, 96, 96),
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5),
    seed: int = 0,
    levels: str = "random",
) -> Path:
    """A TotalSegmentator-like MSD folder: `num_cases` CT scans (int16 HU, `make_ct_case`) of `shape` voxels with
    `num_classes` labels (background included; TotalSegmentator v2 has 117 + background), saved as scanners write
    them: LPS orientation (a negative x and y axis in the affine), `spacing` mm, a table-like origin; `levels` as
    in `make_ct_case`. Returns root.

    512x512x300 at 0.8x0.8x1.5 mm is a typical abdomen CT, 512x512x1000 at 0.8x0.8x1.0 a whole-body one."""
    root = Path(root)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    training = []
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [shape[0] * spacing[0] / 2, shape[1] * spacing[1] / 2 + 150.0, -shape[2] * spacing[2]]
    for i in range(num_cases):
        image, label = make_ct_case(rng, tuple(shape), num_classes, levels)
        name = f"ct_{i:04d}.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / name)
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    labels = {"0": "background", **{str(k): f"organ_{k:03d}" for k in range(1, num_classes)}}
    meta = {
        "name": "SyntheticCT",
        "description": f"medseg synthetic CT, {num_classes - 1} organ-like classes (medseg.data.synthetic)",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": labels,
        "numTraining": num_cases,
        "numTest": 0,
        "training": training,
        "test": [],
        "seed": seed,
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))  # last: its presence marks a complete dataset
    return root
