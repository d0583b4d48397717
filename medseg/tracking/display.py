"""How a slice of a volume is shown, the same in W&B images and in `medseg.report`'s plots."""

import numpy as np


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Intensities stretched between their 1st and 99th percentiles to 0..255 (robust to bright outliers)."""
    lo, hi = np.percentile(image, [1, 99])
    return (np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def axial_view(volume: np.ndarray, z: int) -> np.ndarray:
    """The (X, Y) plane at ``z`` of a RAS volume (X, Y, Z), turned for display: anterior up, patient's right on
    the image's left (radiological convention)."""
    return np.flipud(volume[:, :, z].T)
