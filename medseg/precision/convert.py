"""Which layers of a low-precision net keep FP32, and how: shared by training (`MasterWeightPrecision`) and
prediction, so a net predicts in the same numerics it was trained in."""

import weakref
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from lightning_utilities import apply_to_collection
from torch import Tensor, nn

from medseg.precision.attention import attention_in_fp32
from medseg.precision.precision_plan import match_modules

# Normalisation layers keep FP32 weights (and running statistics): their means and variances over many voxels
# must not be rounded to FP16/BF16. _NormBase covers BatchNorm*, SyncBatchNorm and InstanceNorm*, which are also
# what MONAI's Norm factory returns. ATen's and cuDNN's batch/instance-norm kernels take FP16/BF16 input with FP32
# weights and accumulate the statistics in FP32 (autocast relies on it), so by default these layers are fed the
# low-precision activations as they come; casting them to FP32 and back costs three passes over every activation
# and an FP32 copy kept for backward (the `mixed:normfp32` rows of benchmarks/HISTORY.md, "GPU, second session" and
# "CPU, second session").
# GroupNorm and LayerNorm were not measured that way and always compute in FP32.
STAT_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase,)
NORM_TYPES: tuple[type[nn.Module], ...] = STAT_NORM_TYPES + (nn.GroupNorm, nn.LayerNorm)
# Loss modules (torch's and MONAI's derive from _Loss) keep FP32 buffers such as class weights and compute in
# FP32: softmax/log of low-precision logits is where FP16 hurts most, and a FP16 class weight next to FP32
# logits would not even run. Their output stays FP32.
LOSS_TYPES: tuple[type[nn.Module], ...] = (nn.modules.loss._Loss,)

# modules that already carry the casting hooks: converting a net twice (fit, then test) must not stack them
_HOOKED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
# modules whose output the hooks cast, and to which dtype: looked up when the hook runs, because a norm inside a
# module kept in FP32 must hand FP32 on to its neighbours, and a module may be promoted after it was hooked
_OUTPUT_DTYPE: weakref.WeakKeyDictionary[nn.Module, torch.dtype] = weakref.WeakKeyDictionary()


def cast_floating(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    # integer tensors (labels, counters like num_batches_tracked) must keep their dtype
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _inputs_to_fp32(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return apply_to_collection((args, kwargs), Tensor, cast_floating, torch.float32)


def _output_cast(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    return apply_to_collection(output, Tensor, cast_floating, _OUTPUT_DTYPE[module])


def _cast_at_boundary(module: nn.Module, output_dtype: torch.dtype) -> None:
    """Inputs cast to FP32 before ``module`` runs, its outputs to ``output_dtype`` after (hooks added once)."""
    if module not in _HOOKED:
        module.register_forward_pre_hook(_inputs_to_fp32, with_kwargs=True)
        module.register_forward_hook(_output_cast)
        _HOOKED.add(module)
    _OUTPUT_DTYPE[module] = output_dtype


def keep_fp32(module: nn.Module, dtype: torch.dtype) -> None:
    """Hold ``module`` and its submodules in FP32 and run its forward in FP32, casting its floating inputs to
    FP32 and its outputs back to ``dtype``, the rest of the net's dtype (a module of the plan's
    ``fp32_modules``, or one the advisor promotes during training). In place; Parameter objects keep their
    identity. Norms inside hand FP32 on to their neighbours."""
    if isinstance(module, LOSS_TYPES):
        raise ValueError(f"{type(module).__name__} is a loss: losses always compute in FP32 already")
    for m in module.modules():
        m._apply(partial(cast_floating, dtype=torch.float32), recurse=False)
        if m in _OUTPUT_DTYPE:
            _OUTPUT_DTYPE[m] = torch.float32
    _cast_at_boundary(module, dtype)


def to_low_precision(
    module: nn.Module,
    dtype: torch.dtype,
    norms_in_float32: bool = False,
    fp32_modules: Sequence[str] = (),
    fp32_attention: bool = True,
) -> nn.Module:
    """Cast ``module`` to ``dtype`` (float16/bfloat16) in place, except norm layers and losses, which keep FP32
    weights: BatchNorm/InstanceNorm take the low-precision input (their kernels accumulate in FP32) unless
    ``norms_in_float32``; GroupNorm/LayerNorm, and with ``norms_in_float32`` every norm, get their input cast to
    FP32 and their output back to ``dtype``; losses compute and return FP32. ``fp32_modules`` names submodules
    (as in ``module.named_modules()``) kept wholly in FP32 by ``keep_fp32``. With ``fp32_attention`` and FP16, the
    attention logits and softmax of MONAI's ``SABlock``/``WindowAttention`` run in FP32 (``attention_in_fp32``).

    In place, and `_apply(recurse=False)` one module at a time (what `Module.to` uses), so norm weights are never
    rounded through the low dtype and Parameter objects keep their identity (optimizers built on them stay valid).
    """
    # never rounded through the low dtype, also when a net is converted again (fit, then test)
    kept = {id(m) for name in fp32_modules for m in module.get_submodule(name).modules()}
    for m in module.modules():
        if id(m) in kept:
            continue
        if isinstance(m, NORM_TYPES + LOSS_TYPES):
            m._apply(partial(cast_floating, dtype=torch.float32), recurse=False)
            low_input = isinstance(m, STAT_NORM_TYPES) and not norms_in_float32
            if isinstance(m, LOSS_TYPES) and m not in _HOOKED:
                m.register_forward_pre_hook(_inputs_to_fp32, with_kwargs=True)
                _HOOKED.add(m)
            elif isinstance(m, NORM_TYPES) and not low_input:
                _cast_at_boundary(m, dtype)
        else:
            m._apply(partial(cast_floating, dtype=dtype), recurse=False)
    for name in fp32_modules:
        keep_fp32(module.get_submodule(name), dtype)
    if fp32_attention and dtype == torch.float16:
        attention_in_fp32(module)
    return module


def to_float32(module: nn.Module) -> nn.Module:
    """``module`` wholly in FP32, in place, also after ``to_low_precision``: the casting hooks it left (on norms and
    on modules kept in FP32) hand FP32 on from now on, instead of the low dtype the rest of the net had."""
    module.float()
    for m in module.modules():
        if m in _OUTPUT_DTYPE:
            _OUTPUT_DTYPE[m] = torch.float32
    return module


def net_fp32_modules(net: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names in `net` of the modules a plan's `patterns` name in the LightningModule, where the net is `net`
    (`SegmentationModule.net`); a `PrecisionPlanError` naming the patterns that match none of them."""
    if not patterns:
        return []
    holder = nn.Module()
    holder.net = net  # the LightningModule's names, `net.` + the net's own
    names = match_modules(holder, patterns, "precision plan fp32_modules")
    return [n.removeprefix("net").removeprefix(".") for n in names]  # "net" itself: "" (the whole net)


def convert_net(net: nn.Module, dtype: torch.dtype, fp32_modules: Sequence[str] = ()) -> nn.Module:
    """`net` in `dtype`, in place, for prediction and the test pass: FP32 as a whole; BF16/FP16 as the training
    plugin converts it (`to_low_precision`), the modules named by `fp32_modules` (a precision plan's patterns, names
    as in the LightningModule: `medseg.precision.precision_plan.saved_fp32_modules`) kept in FP32."""
    if dtype == torch.float32:
        return to_float32(net)
    return to_low_precision(net, dtype, fp32_modules=net_fp32_modules(net, fp32_modules))
