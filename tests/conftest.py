"""Shared fixtures: the real conf/ composed with small overrides, tiny synthetic datasets, real data paths."""

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from medseg import CONF_DIR, REPO_ROOT
from medseg.data.synthetic import write_synthetic_dataset

from .helpers import TINY, TINY_UNET

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")


def shared_dataset(name: str) -> Path:
    """A real MSD folder from ../shared/data (or $MEDSEG_DATASETS); skips the test, saying where it looked."""
    base = Path(os.environ.get("MEDSEG_DATASETS", REPO_ROOT / ".." / "shared" / "data"))
    path = (base / name).resolve()
    if not (path / "dataset.json").is_file():
        pytest.skip(f"real dataset {name} not found at {path} (set MEDSEG_DATASETS to the folder holding it)")
    return path


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """8 synthetic cases of 32-36 voxels a side (6 train, 2 validation)."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("tiny") / "synthetic", num_cases=8, min_size=32, max_size=36)


def compose_cfg(overrides: list[str], output_dir: Path, config_name: str = "train") -> DictConfig:
    """The real conf/ composed as `python -m medseg.<config_name>` would, with hydra-only keys filled in."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        del cfg.hydra
    return cfg


@pytest.fixture
def tiny_cfg(tiny_dataset, tmp_path):
    """Compose with TINY overrides on the tiny dataset; extra overrides appended."""

    def make(*extra: str) -> DictConfig:
        other_model = any(e.startswith(("model=", "experiment=")) for e in extra)
        overrides = [
            *TINY,
            *([] if other_model else TINY_UNET),
            f"data.root={tiny_dataset}",
            "++data.synthesize=null",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"paths.log_dir={tmp_path / 'logs'}",
            *extra,
        ]
        return compose_cfg(overrides, tmp_path / "run")

    return make
