"""One trained model as it is exported: its FP32 net and everything `medseg.predict` would apply around it."""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from medseg import CONF_DIR
from medseg.checkpoint import CheckpointError, fp32_net_state, load_checkpoint
from medseg.inference import postprocess
from medseg.inference.ensemble import checkpoint_paths
from medseg.precision.precision_plan import saved_fp32_modules


@dataclass
class TrainedModel:
    """Args:
    path: the checkpoint file.
    net: the network in FP32 (the masters of a `+precision=mixed` run), eval mode, on the CPU.
    info: the checkpoint's `hyper_parameters.inference` (net config, spacing, modality, ct_window, patch_size,
        label_names).
    mirror_axes: the spatial axes whose flips are averaged, as the model was tested after training.
    keep_largest: the classes whose largest connected component alone is kept (the test pass's decision; [] if
        it made none).
    sw_batch_size, overlap: sliding-window settings, `medseg.predict`'s defaults (conf/predict.yaml).
    fp32_modules: the modules the checkpoint's precision plan keeps in FP32 (names as in the LightningModule).
    """

    path: Path
    net: nn.Module
    info: dict
    mirror_axes: list[int]
    keep_largest: list[int]
    sw_batch_size: int
    overlap: float
    fp32_modules: list[str] = field(default_factory=list)

    @property
    def in_channels(self) -> int:
        return int(self.info["net"]["in_channels"])

    @property
    def label_names(self) -> list[str]:
        return list(self.info["label_names"])

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """A random float32 batch (batch, C_in, *patch_size): what the sliding window feeds the net."""
        generator = torch.Generator().manual_seed(0)
        return torch.randn(batch, self.in_channels, *self.info["patch_size"], generator=generator)


def load_trained(ckpt_path: str | Path, allow_unsafe: bool = False) -> TrainedModel:
    """The model of one checkpoint, or of a run folder's best checkpoint; a CheckpointError for an ensemble."""
    paths = checkpoint_paths(str(ckpt_path))
    if len(paths) > 1:
        raise CheckpointError(f"{ckpt_path}: {len(paths)} checkpoints (an ensemble); export one run or checkpoint")
    [path] = paths
    ckpt = load_checkpoint(path, allow_unsafe=allow_unsafe)
    info = ckpt["hyper_parameters"]["inference"]
    net = instantiate(info["net"])
    net.load_state_dict(fp32_net_state(ckpt))
    record = postprocess.for_checkpoints([path])
    defaults = OmegaConf.load(CONF_DIR / "predict.yaml")
    return TrainedModel(
        path=path,
        net=net.float().eval(),
        info=info,
        mirror_axes=[int(a) for a in ckpt["hyper_parameters"].get("test_mirror_axes", ())],
        keep_largest=record["keep_largest"] if record else [],
        sw_batch_size=int(defaults.sw_batch_size),
        overlap=float(defaults.overlap),
        fp32_modules=saved_fp32_modules(ckpt),
    )
