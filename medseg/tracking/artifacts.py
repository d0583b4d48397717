"""Model lineage in W&B: the dataset a run trained on as a reference artifact the run uses, and the best
checkpoint with the plans and the composed config as a `model` artifact the run produces, so a model's lineage
names its data (`callbacks.wandb_artifacts`)."""

import hashlib
import json
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only

from medseg.tracking.loggers import wandb_loggers

# Beside the checkpoint in the model artifact, when the run wrote them (`precision_plan.yaml`: the plugin, once a
# module is kept in FP32; `training_plan.yaml`: planning from the data; `.hydra/`: every Hydra job).
RUN_FILES = ("training_plan.yaml", "precision_plan.yaml", ".hydra/config.yaml", ".hydra/overrides.yaml")


@dataclass
class DatasetFingerprint:
    """What identifies an MSD folder without reading its voxels: the folder, its training cases, and a SHA-256
    over the sorted (relative path, size) of dataset.json and every file its `training` list names."""

    path: str
    cases: int
    files: int
    sha256: str


def dataset_files(root: Path) -> list[Path]:
    """dataset.json and the images and labels its `training` list names (paths relative to `root`)."""
    meta = json.loads((root / "dataset.json").read_text())
    names = [Path("dataset.json")]
    for item in meta.get("training", []):
        names += [Path(item[k]) for k in ("image", "label") if item.get(k)]
    return [Path(*n.parts[1:]) if n.parts and n.parts[0] == "." else n for n in names]


def fingerprint(root: str | Path) -> DatasetFingerprint:
    root = Path(root).resolve()
    files = dataset_files(root)
    digest = hashlib.sha256()
    for name in sorted(files):
        size = (root / name).stat().st_size if (root / name).is_file() else -1  # a missing file changes the hash
        digest.update(f"{name.as_posix()}\t{size}\n".encode())
    cases = len(json.loads((root / "dataset.json").read_text()).get("training", []))
    return DatasetFingerprint(str(root), cases, len(files), digest.hexdigest())


def artifact_name(text: str) -> str:
    """`text` with what W&B refuses in an artifact name (anything but letters, digits, `-`, `_`, `.`) as `-`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "unnamed"


def dataset_artifact(root: str | Path) -> Any:
    """A `dataset` artifact referencing (not uploading) the folder's files, with the fingerprint as metadata."""
    import wandb

    found = fingerprint(root)
    artifact = wandb.Artifact(artifact_name(f"dataset-{Path(found.path).name}"), type="dataset",
                              metadata=asdict(found))  # fmt: skip
    for name in dataset_files(Path(found.path)):
        if (Path(found.path) / name).is_file():
            # checksum=False: a reference by path, no pass over the voxels; the fingerprint carries the sizes
            artifact.add_reference(f"file://{Path(found.path) / name}", name=name.as_posix(), checksum=False)
    return artifact


def model_artifact(run_id: str, checkpoint: Path, run_dir: Path, metadata: dict[str, Any]) -> Any:
    """A `model` artifact: the checkpoint and the run's plan and config files that exist."""
    import wandb

    artifact = wandb.Artifact(artifact_name(f"model-{run_id}"), type="model", metadata=metadata)
    # immutable: referenced in place, not copied; checkpoints are renamed into place, never rewritten
    artifact.add_file(str(checkpoint), name=f"checkpoints/{checkpoint.name}", policy="immutable")
    for name in RUN_FILES:
        if (run_dir / name).is_file():
            artifact.add_file(str(run_dir / name), name=name)
    return artifact


def use(run: Any, artifact: Any) -> None:
    """Mark `artifact` as an input of `run`. W&B's `use_artifact` refuses offline runs, so there the artifact is
    logged with `use_after_commit`, the flag `use_artifact` itself sets for a new artifact: `wandb sync` then
    commits it and records the use, as an online run would have."""
    if run.offline:
        run._log_artifact(artifact, use_after_commit=True, is_user_created=True)
    else:
        run.use_artifact(artifact)


class WandbArtifacts(pl.Callback):
    """For a W&B run: at the start of training the dataset reference, used by the run; at its end the best
    checkpoint (with `training_plan.yaml`, `precision_plan.yaml` and the composed config) as a `model` artifact,
    aliased `best`. Offline runs keep both in their run file until `wandb sync`. A failure warns once.

    Args:
        output_dir: the run directory (plans and `.hydra/` are read from it).
    """

    def __init__(self, output_dir: str) -> None:
        self.run_dir = Path(output_dir)
        self.failed = False

    def _guard(self, what: str, fn) -> None:
        if self.failed:
            return
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - lineage must never stop training
            self.failed = True
            warnings.warn(f"W&B artifacts: {what} failed ({type(err).__name__}: {err})", stacklevel=3)

    @rank_zero_only
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        root = getattr(getattr(trainer, "datamodule", None), "root", None)
        if root is None or not (Path(root) / "dataset.json").is_file():
            return
        for logger in wandb_loggers(trainer):
            self._guard("the dataset reference", lambda lg=logger: use(lg.experiment, dataset_artifact(root)))

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ckpt = trainer.checkpoint_callback
        best = Path(ckpt.best_model_path) if ckpt is not None and ckpt.best_model_path else None
        if best is None or not best.is_file():
            return
        score = ckpt.best_model_score
        metadata = {
            "monitor": ckpt.monitor,
            "best_score": float(score) if score is not None else None,
            "global_step": trainer.global_step,
            "label_names": list(getattr(pl_module, "label_names", [])),
        }
        for logger in wandb_loggers(trainer):
            run = logger.experiment
            artifact = model_artifact(run.id, best, self.run_dir, metadata)
            self._guard("the model artifact", lambda r=run, a=artifact: r.log_artifact(a, aliases=["best"]))
