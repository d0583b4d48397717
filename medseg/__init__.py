"""medseg: 3D medical image segmentation with Hydra, Lightning and MONAI."""

from pathlib import Path

from omegaconf import OmegaConf

# conf/ sits beside the package in the repository (`pip install -e .`); configs refer to the repo root
# through this resolver rather than to the working directory, which Hydra users change freely.
REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
OmegaConf.register_new_resolver("medseg_root", lambda: str(REPO_ROOT), replace=True)
