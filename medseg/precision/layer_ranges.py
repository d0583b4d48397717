"""Per-layer value ranges of one training step: the activation and output-gradient abs-max of every layer."""

from functools import partial
from typing import Any

import torch
from torch import Tensor, nn


def first_tensor(output: Any) -> Tensor | None:
    """``output`` if it is a tensor, else the first tensor of a tuple/list (DynUNet's deep-supervision heads)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return next((o for o in output if isinstance(o, Tensor)), None)
    return None


def weighted_leaves(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named leaf modules with weights (convolutions, norms, PReLU, linear), losses excluded: activation-only leaves
    such as dropout or ReLU pass on what the layer before them produced, and hooking them would double the cost
    for nothing."""
    return [
        (name, m)
        for name, m in module.named_modules()
        if not isinstance(m, nn.modules.loss._Loss)
        and next(m.children(), None) is None
        and next(m.parameters(recurse=False), None) is not None
    ]


def _absmax(tensor: Tensor) -> Tensor:
    low, high = torch.aminmax(tensor.detach())  # one pass; abs().amax() reads the tensor twice
    return torch.maximum(low.abs(), high)


class LayerRanges:
    """Records, while attached, each layer's output abs-max and the abs-max of the gradient flowing into that
    output (the scaled, low-precision one during backward: what can overflow). Values stay 0-dim tensors on the
    device until the caller reads them; a layer called twice keeps its larger value.

    Usage: ``attach(module)`` before the forward pass, ``detach()`` after the backward pass.
    """

    def __init__(self) -> None:
        self._layers: list[tuple[str, nn.Module]] | None = None  # found on the first attach
        self._handles: list[Any] = []
        self.acts: dict[str, Tensor] = {}
        self.out_grads: dict[str, Tensor] = {}

    def attach(self, module: nn.Module) -> None:
        if self._layers is None:
            self._layers = weighted_leaves(module)
        for name, layer in self._layers:
            self._handles.append(layer.register_forward_hook(partial(self._record_output, name)))

    def detach(self) -> tuple[dict[str, Tensor], dict[str, Tensor]] | None:
        """Remove the hooks; ``(activation abs-max, output-gradient abs-max)`` by layer name, None if nothing ran."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        ranges = (self.acts, self.out_grads) if self.acts else None
        self.acts, self.out_grads = {}, {}
        return ranges

    def _record_output(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        out = first_tensor(output)
        if out is None or not out.is_floating_point() or out.numel() == 0:
            return
        value = _absmax(out)
        self.acts[name] = torch.maximum(self.acts[name], value) if name in self.acts else value
        if out.requires_grad:
            out.register_hook(partial(self._record_grad, name))

    def _record_grad(self, name: str, grad: Tensor) -> None:
        if grad.numel() == 0:
            return
        value = _absmax(grad)
        self.out_grads[name] = torch.maximum(self.out_grads[name], value) if name in self.out_grads else value
