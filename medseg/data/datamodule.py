"""MSDDataModule: any Medical Segmentation Decathlon folder (dataset.json + imagesTr/ + labelsTr/)."""

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import lightning.pytorch as pl
import monai
import nibabel as nib
import numpy as np
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset, load_decathlon_datalist
from monai.transforms import Compose

from medseg.config_check import ConfigError
from medseg.data.integrity import check_dataset
from medseg.data.integrity_cache import cache_file, per_file
from medseg.data.resumable import ResumableDataLoader
from medseg.data.synthetic import write_synthetic_dataset
from medseg.data.transforms import augment, preprocess

log = logging.getLogger(__name__)


def header_geometry(images: Iterable[str | Path], cache: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Voxel spacing and shape of each image in RAS axis order (as Orientationd will reorder them), from the
    headers only (fast). Returns two (N, 3) arrays. With `cache` (a JSON file), headers of files unchanged since
    it was written are not read again (at 1,000 cases the reads were most of a second start; benchmarks/RESULTS.md,
    "Whole-body scale"). Also read by `medseg.planning.fingerprint`."""

    def read(path: str) -> list:
        img = nib.load(path)
        axes = nib.orientations.io_orientation(img.affine)[:, 0].astype(int)
        zoom, shape = np.empty(3), np.empty(3)
        zoom[axes] = img.header.get_zooms()[:3]
        shape[axes] = img.shape[:3]
        return [zoom.tolist(), shape.tolist()]

    geometry = per_file([str(p) for p in images], read, cache)
    return np.array([g[0] for g in geometry], dtype=float), np.array([g[1] for g in geometry], dtype=float)


def num_validation(num_cases: int, val_fraction: float) -> int:
    """Cases held out for validation when `val_fraction` of `num_cases` is asked for: at least one. Also read by
    `medseg.planning` (the training length counts them)."""
    return max(1, round(num_cases * val_fraction))


def split_indices(
    num_cases: int, seed: int, val_fraction: float, fold: int = 0, num_folds: int | None = None
) -> tuple[list[int], list[int]]:
    """medseg's train/validation split of cases 0..num_cases-1: a seeded shuffle, then either the last
    `val_fraction` or fold `fold` of `num_folds` for validation. Returns (train indices in shuffled order,
    validation indices sorted). Also read by benchmarks/peers (the same cases for another tool)."""
    order = np.random.default_rng(seed).permutation(num_cases)
    if num_folds is None:
        val_idx = set(order[num_cases - num_validation(num_cases, val_fraction) :].tolist())
    else:
        val_idx = set(np.array_split(order, num_folds)[fold].tolist())
    return [int(i) for i in order if i not in val_idx], sorted(val_idx)


class MSDDataModule(pl.LightningDataModule):
    """Reads channels, label names and the training list from `root/dataset.json`.

    Args:
        root: the MSD folder.
        patch_size: training patch (and sliding-window ROI) in voxels at the target spacing.
        spacing: target spacing in mm; None = the dataset's median spacing (nnU-Net's default).
        batch_size: images per training batch; each yields `num_samples` patches, so a batch holds
            `batch_size * num_samples` patches.
        num_samples, pos, neg, flip_axes, affine_prob, intensity_prob: see `medseg.data.transforms.augment`.
        val_fraction: share of cases held out when `num_folds` is None.
        fold, num_folds: k-fold split instead (fold in [0, num_folds)).
        cache: "persistent" (on disk, survives runs), "memory" (CacheDataset) or "none".
        cache_dir: where persistent caches live; one subfolder per dataset and preprocessing.
        synthesize: kwargs for `write_synthetic_dataset`; when given and `root` has no dataset.json, the
            synthetic dataset is written there first.
        validate: check the whole dataset (every file) before training and fail with every problem listed.
    """

    def __init__(
        self,
        root: str,
        patch_size: Sequence[int] = (96, 96, 96),
        spacing: Sequence[float] | None = None,
        batch_size: int = 2,
        num_samples: int = 2,
        pos: float = 2.0,
        neg: float = 1.0,
        flip_axes: Sequence[int] = (0, 1, 2),
        affine_prob: float = 0.2,
        intensity_prob: float = 0.15,
        ct_window: Sequence[float] = (-1000.0, 1000.0),
        val_fraction: float = 0.2,
        fold: int = 0,
        num_folds: int | None = None,
        seed: int = 0,
        cache: str = "persistent",
        cache_dir: str | None = None,
        num_workers: int = 2,
        synthesize: dict | None = None,
        validate: bool = True,
    ) -> None:
        super().__init__()
        if cache not in ("persistent", "memory", "none"):
            raise ConfigError(f"data.cache must be 'persistent', 'memory' or 'none', got {cache!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        if num_folds is not None and not 0 <= fold < num_folds:
            raise ConfigError(f"data.fold must be in [0, data.num_folds={num_folds}), got {fold}")
        self.root = Path(root).expanduser()
        self.patch_size = tuple(int(p) for p in patch_size)
        self.batch_size, self.num_samples, self.num_workers = batch_size, num_samples, num_workers
        self.aug = dict(
            num_samples=num_samples,
            pos=pos,
            neg=neg,
            flip_axes=tuple(flip_axes),
            affine_prob=affine_prob,
            intensity_prob=intensity_prob,
        )
        self.ct_window = tuple(ct_window)
        self.val_fraction, self.fold, self.num_folds, self.seed = val_fraction, fold, num_folds, seed
        self.cache = cache
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else self.root / ".medseg_cache"

        if synthesize is not None and not (self.root / "dataset.json").exists():
            log.info("Writing the synthetic dataset to %s", self.root)
            write_synthetic_dataset(self.root, **synthesize)
        if validate:
            check_dataset(self.root, cache_dir=self.cache_dir, workers=self.num_workers).raise_if_errors()
        elif not (self.root / "dataset.json").is_file():
            raise ConfigError(f"data.root: no dataset.json in {self.root}")
        self.meta = json.loads((self.root / "dataset.json").read_text())
        zooms, shapes = self.geometry()  # headers read once: median spacing and the patch check both need them
        self.spacing = tuple(float(s) for s in (spacing if spacing is not None else np.median(zooms, axis=0)))
        self.check_patch_size(zooms, shapes)
        self.train_files: list[dict] = []
        self.val_files: list[dict] = []

    # What the model needs to know about the data, straight from dataset.json.
    @property
    def modalities(self) -> list[str]:
        return [self.meta["modality"][k] for k in sorted(self.meta["modality"], key=int)]

    @property
    def in_channels(self) -> int:
        return len(self.meta["modality"])

    @property
    def label_names(self) -> list[str]:
        """Names of classes 0..N-1 (0 is background)."""
        return [self.meta["labels"][k] for k in sorted(self.meta["labels"], key=int)]

    @property
    def num_classes(self) -> int:
        return len(self.meta["labels"])

    @property
    def modality(self) -> str:
        """CT normalisation when every channel is CT, else MRI-style z-score."""
        return "CT" if all(m.upper() == "CT" for m in self.modalities) else "MRI"

    def datalist(self) -> list[dict]:
        return load_decathlon_datalist(self.root / "dataset.json", data_list_key="training", base_dir=self.root)

    def geometry(self) -> tuple[np.ndarray, np.ndarray]:
        """Voxel spacing and shape of every training image: `header_geometry` of the datalist."""
        cache = cache_file(self.cache_dir, self.root, "headers")
        return header_geometry((item["image"] for item in self.datalist()), cache)

    def check_patch_size(self, zooms: np.ndarray, shapes: np.ndarray) -> None:
        """A patch larger than every image (after resampling) on some axis would be mostly padding.
        `zooms`, `shapes`: (N, 3) arrays from `geometry()`."""
        largest = (shapes * zooms / np.asarray(self.spacing)).max(axis=0)
        if any(p > s + 0.5 for p, s in zip(self.patch_size, largest, strict=True)):
            raise ConfigError(
                f"data.patch_size: {list(self.patch_size)} is larger than every image after resampling to "
                f"{list(self.spacing)} mm (largest: {[int(round(s)) for s in largest]})"
            )

    def split(self) -> tuple[list[dict], list[dict]]:
        """`split_indices` of the datalist: (train items, validation items)."""
        items = self.datalist()
        train_idx, val_idx = split_indices(len(items), self.seed, self.val_fraction, self.fold, self.num_folds)
        train, val = [items[i] for i in train_idx], [items[i] for i in val_idx]
        if not train:
            raise ConfigError(
                f"data.val_fraction: {self.root} has too few cases ({len(items)}) to hold out a validation split"
            )
        return train, val

    def preprocessing(self, with_label: bool = True) -> Compose:
        return preprocess(self.spacing, self.modality, self.patch_size, self.ct_window, with_label=with_label)

    def cache_key(self) -> str:
        """Preprocessing settings that change the cached arrays; a change gets a fresh cache folder."""
        spec = {
            "spacing": self.spacing,
            "modality": self.modality,
            "patch": self.patch_size,
            "ct_window": self.ct_window,
            "monai": monai.__version__,
            "version": 2,
        }
        return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]

    def _dataset(self, files: list[dict], transform: Compose) -> Dataset:
        if self.cache == "persistent":
            cache_dir = self.cache_dir / self.cache_key()
            cache_dir.mkdir(parents=True, exist_ok=True)
            return PersistentDataset(files, transform=transform, cache_dir=cache_dir)
        if self.cache == "memory":
            return CacheDataset(files, transform=transform, num_workers=self.num_workers or None, progress=False)
        return Dataset(files, transform=transform)

    def setup(self, stage: str | None = None) -> None:
        if self.train_files:
            return
        self.train_files, self.val_files = self.split()
        log.info(
            "%s: %d train / %d val cases, spacing %s, patch %s, %d channel(s) %s, classes %s",
            self.root.name,
            len(self.train_files),
            len(self.val_files),
            self.spacing,
            self.patch_size,
            self.in_channels,
            self.modalities,
            self.label_names,
        )
        # Deterministic steps come first so the cached datasets hold them; augmentation runs on top.
        train_tf = Compose([self.preprocessing(), augment(self.patch_size, **self.aug)]).flatten()
        self.train_set = self._dataset(self.train_files, train_tf)
        self.val_set = self._dataset(self.val_files, self.preprocessing())

    def train_dataloader(self) -> ResumableDataLoader:
        # Shuffle and augmentation seeded per (epoch, item): a run resumed mid-epoch sees the same batches.
        trainer = self.trainer
        return ResumableDataLoader(
            self.train_set,
            seed=self.seed,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            drop_last=len(self.train_files) >= self.batch_size,
            num_replicas=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
        )

    def val_dataloader(self) -> DataLoader:
        # Whole volumes of different sizes: one per batch, sliding-window inference does the tiling.
        return DataLoader(self.val_set, batch_size=1, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
