"""FP32 master weights: made for an optimizer's low-precision parameters, given their gradients, copied back.

What ``MasterWeightPrecision`` keeps per optimizer (``Masters``) and the multi-tensor operations on it; the plugin
decides when each runs (``medseg.precision.plugin``).
"""

from dataclasses import dataclass

import torch
from lightning_utilities import apply_to_collection
from torch import Tensor, nn
from torch.optim import Optimizer

from medseg.precision.convert import cast_floating
from medseg.precision.dtypes import LOW_DTYPES

# Optimizers with a `fused=True` kernel on both CPU and CUDA. The step on the masters comes right after the
# plugin's one host sync, with no GPU work queued behind it, so its launch overhead is GPU idle time: the fused
# kernel takes one launch for all masters instead of a dozen multi-tensor ones (measured on an H200: the `opt ms`
# column, benchmarks/RESULTS.md "Training step speed and memory per precision: GPU (H200)", and HISTORY.md "GPU,
# first session"); on CPU it replaces a Python loop over the parameters.
FUSED_OPTIMIZERS: tuple[type[Optimizer], ...] = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)
# Fused kernels that skip the whole update on the device when `optimizer.found_inf` is nonzero (the hook torch
# gives GradScaler) and undo their step count. Not SGD: on a skipped first step its fused path leaves the momentum
# buffers it allocated with `empty_like` uninitialised.
DEVICE_SKIP_OPTIMIZERS: tuple[type[Optimizer], ...] = (torch.optim.Adam, torch.optim.AdamW)


@dataclass
class Masters:
    """One optimizer's parameters, in ``param_groups`` order.

    ``model_params[i]`` is the model's tensor (low precision, or FP32 for norm layers) and
    ``master_params[i]`` its FP32 master (the same object where the model's tensor is already FP32).
    ``low_model``/``low_master`` are the pairs that differ, aligned, for the multi-tensor copies.
    """

    names: list[str]
    model_params: list[Tensor]
    master_params: list[Tensor]
    low_model: list[Tensor]
    low_master: list[Tensor]
    fp32_params: list[Tensor]
    # FP32 gradients of low_master, allocated on the first step and reused: zero_grad only drops the reference
    grad_buffers: list[Tensor] | None = None
    # flat FP32 copy of low_master before this step's update, taken for whoever samples lost updates (the monitor,
    # the advisor) on the first request of the step and shared; dropped when the step ends
    before_step: Tensor | None = None

    def snapshot(self) -> Tensor:
        """``low_master`` before this step's update, flattened into one FP32 tensor (copied once per step)."""
        if self.before_step is None:
            self.before_step = torch.cat([m.detach().reshape(-1) for m in self.low_master])
        return self.before_step

    def low_names(self) -> list[str]:
        """The parameter names of ``low_master``, aligned."""
        pairs = zip(self.names, self.model_params, self.master_params, strict=True)
        return [n for n, p, m in pairs if p is not m]


def make_master(param: Tensor) -> Tensor:
    """``param``'s FP32 master: itself when already FP32 (norm layers), else an FP32 copy with its own storage (it
    must not alias the low-precision weight it is copied into after each step)."""
    if param.dtype not in LOW_DTYPES:
        return param
    return nn.Parameter(param.detach().to(torch.float32, copy=True), requires_grad=param.requires_grad)


def point_at_masters(optimizer: Optimizer, masters_of: dict[Tensor, Tensor], names: dict[Tensor, str]) -> Masters:
    """Replace ``optimizer``'s parameters by their FP32 masters (made on first sight, kept in ``masters_of`` so a
    parameter shared by two optimizers gets one master) and move state it already holds onto them, in FP32."""
    model_params: list[Tensor] = []
    master_params: list[Tensor] = []
    for group in optimizer.param_groups:
        group_masters = []
        for p in group["params"]:
            if p not in masters_of:
                masters_of[p] = make_master(p)
            group_masters.append(masters_of[p])
        model_params.extend(group["params"])
        master_params.extend(group_masters)
        group["params"] = group_masters
    # state of an optimizer that already stepped follows its parameters, in FP32 like them
    for p, m in zip(model_params, master_params, strict=True):
        if p is not m and p in optimizer.state:
            state = optimizer.state.pop(p)
            optimizer.state[m] = apply_to_collection(state, Tensor, cast_floating, torch.float32)
    low = [(p, m) for p, m in zip(model_params, master_params, strict=True) if p is not m]
    prefer_fused(optimizer)
    return Masters(
        names=[names.get(p, "") for p in model_params],
        model_params=model_params,
        master_params=master_params,
        low_model=[p for p, _ in low],
        low_master=[m for _, m in low],
        fp32_params=[p for p, m in zip(model_params, master_params, strict=True) if p is m],
    )


def prefer_fused(optimizer: Optimizer) -> None:
    """Switch the param groups that left the implementation to torch (``foreach`` and ``fused`` both None) to the
    fused kernel, when every parameter is an FP32 tensor on CPU or CUDA (which the masters are)."""
    if type(optimizer) not in FUSED_OPTIMIZERS:  # exact type: a subclass may override `step`
        return
    for group in optimizer.param_groups:
        chosen = group.get("fused") is not None or group.get("foreach") is not None or group.get("differentiable")
        supported = all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in group["params"])
        if not chosen and supported:
            group["fused"] = True


def skips_on_device(optimizer: Optimizer) -> bool:
    """Whether ``optimizer``'s step skips itself on the device on inf/NaN (see ``DEVICE_SKIP_OPTIMIZERS``)."""
    return type(optimizer) in DEVICE_SKIP_OPTIMIZERS and all(g.get("fused") for g in optimizer.param_groups)


def grads_to_masters(entry: Masters) -> list[Tensor]:
    """Move the low-precision gradients into the masters' FP32 grads; returns every master gradient."""
    if entry.grad_buffers is None:
        entry.grad_buffers = [torch.empty_like(m) for m in entry.low_master]
    with_grad = [i for i, p in enumerate(entry.low_model) if p.grad is not None]
    low_grads = [entry.grad_buffers[i] for i in with_grad]
    if with_grad:
        torch._foreach_copy_(low_grads, [entry.low_model[i].grad for i in with_grad])
    for i in with_grad:
        entry.low_master[i].grad = entry.grad_buffers[i]
        # the FP32 copy is all the step needs; releasing the low one now lowers peak memory
        entry.low_model[i].grad = None
    return low_grads + [p.grad for p in entry.fp32_params if p.grad is not None]


def copy_to_model(entry: Masters) -> None:
    """Round the masters into the model's low-precision weights."""
    if entry.low_model:
        with torch.no_grad():
            torch._foreach_copy_(entry.low_model, entry.low_master)


def release_grads(entry: Masters) -> None:
    """Drop the FP32 gradient buffers, needed only during steps (the masters stay, for a checkpoint after fit)."""
    entry.grad_buffers = None
    for m in entry.low_master:
        m.grad = None


def nonfinite_modules(entry: Masters) -> list[str]:
    """Modules, in the optimizer's parameter order, whose gradient in this step (now the masters' grads) holds
    inf/NaN. Only on overflow steps: one finiteness check per parameter, read back once."""
    named = [(n, m.grad) for n, m in zip(entry.names, entry.master_params, strict=True) if m.grad is not None]
    finite = torch.stack([torch.isfinite(g).all() for _, g in named]).tolist() if named else []
    return list(dict.fromkeys(n.rsplit(".", 1)[0] for (n, _), ok in zip(named, finite, strict=True) if not ok))
