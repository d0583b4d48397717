"""Checks on the composed config that run before any work: a one-line error naming the key, not a stack trace
from inside a library minutes later."""

import inspect
import shutil
import tempfile
from pathlib import Path

from hydra.utils import get_method
from omegaconf import DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    """A setting is wrong; the message starts with the key."""


def _unknown_keys(node: DictConfig, path: str) -> list[str]:
    """Keys of a `_target_` node that its callable does not accept (typos such as `lrr`, or an option the
    target does not know), recursively."""
    problems = []
    target = node.get("_target_")
    if target is not None:
        try:
            fn = get_method(target)
        except Exception as err:  # noqa: BLE001 - report any import failure as a config problem
            return [f"{path}._target_: cannot import {target!r} ({err})"]
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            params = {}
        takes_any = not params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        known = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        for key in node:
            if str(key).startswith("_") or takes_any or key in params:
                continue
            problems.append(f"{path}.{key}: unknown option for {target} (it takes: {', '.join(known)})")
    for key, value in node.items_ex(resolve=False):
        if isinstance(value, DictConfig):
            problems += _unknown_keys(value, f"{path}.{key}" if path else str(key))
    return problems


# Transformer U-Nets take only patch sizes that their token grid divides: UNETR cuts 16^3 tokens and its decoder
# doubles four times; SwinUNETR halves five times (patch embedding, then four stages) and its bottleneck instance
# norm needs more than one voxel (MONAI raises "Expected more than 1 spatial element" deep inside the first step).
TRANSFORMER_FACTORS = {"UNETR": 16, "SwinUNETR": 32}


def _transformer_patch(name: str, patch: list[int]) -> list[str]:
    factor = TRANSFORMER_FACTORS[name]
    fixed = [max(factor, -(-p // factor) * factor) for p in patch]  # the next multiple up
    if name == "SwinUNETR" and all(f == factor for f in fixed):
        fixed[0] = 2 * factor
    bottleneck = 1
    for p in patch:
        bottleneck *= p // factor
    if any(p % factor for p in patch) or (name == "SwinUNETR" and bottleneck < 2):
        rule = f"multiples of {factor}" + (" with more than one voxel at the bottleneck" if name == "SwinUNETR" else "")
        return [f"data.patch_size: {patch} cannot go through {name}: sizes must be {rule}, e.g. {fixed}"]
    return []


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError listing every problem found in `cfg` (a composed `conf/train.yaml`)."""
    problems = []
    for section in ("data", "model", "trainer", "callbacks", "logger", "precision"):
        node = cfg.get(section)
        if isinstance(node, DictConfig):
            problems += _unknown_keys(node, section)

    lr = OmegaConf.select(cfg, "model.optimizer.lr")
    if lr is not None and not lr > 0:
        problems.append(f"model.optimizer.lr: must be > 0, got {lr}")
    patch = OmegaConf.select(cfg, "data.patch_size")
    if isinstance(patch, ListConfig | list) and (len(patch) != 3 or any(int(p) < 1 for p in patch)):
        problems.append(f"data.patch_size: must be 3 positive sizes, got {list(patch)}")
    strides = OmegaConf.select(cfg, "model.net.strides")
    if isinstance(patch, ListConfig) and isinstance(strides, ListConfig) and "UNet" in str(cfg.model.net._target_):
        factor = 1
        for s in strides:
            factor *= int(s)
        bad = [int(p) for p in patch if int(p) % factor]
        if bad:
            problems.append(
                f"data.patch_size: {list(patch)} must be divisible by {factor} (the product of model.net.strides)"
            )
    target = str(OmegaConf.select(cfg, "model.net._target_") or "")
    if isinstance(patch, ListConfig) and len(patch) == 3 and target.rsplit(".", 1)[-1] in TRANSFORMER_FACTORS:
        problems += _transformer_patch(target.rsplit(".", 1)[-1], [int(p) for p in patch])
    if problems:
        raise ConfigError("\n".join(problems))


def check_output_dir(path: str | Path, min_free_mb: int = 200) -> None:
    """Fail before training, not at the first checkpoint: the run directory must be writable and have room."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test"):
            pass
    except OSError as err:
        raise ConfigError(f"paths.output_dir: cannot write to {path} ({err.strerror or err})") from None
    free_mb = shutil.disk_usage(path).free / 2**20
    if free_mb < min_free_mb:
        raise ConfigError(
            f"paths.output_dir: only {free_mb:.0f} MB free on the disk holding {path}; checkpoints need more "
            f"(at least {min_free_mb} MB)"
        )
