"""Op-level FP32 inside MONAI's attention blocks: in an FP16 net, the attention logits (q.k^T) and their softmax
run in FP32 while the projections, which hold all of the block's weights, stay FP16.

Why: FP16 stops at 65504 and q.k^T is where an attention block leaves that range first (pytorch/pytorch#60939:
"the product of q and k may have inf in the output and it will lead to nan in the following softmax";
microsoft/Swin-Transformer#345: NaN loss training Swin under FP16 AMP). MONAI's ``SABlock`` (UNETR's ViT)
multiplies q.k^T by ``dim_head**-0.5`` *after* the product, so its FP16 logits overflow once the unscaled product
passes 65504 (scaled logits of 65504 / sqrt(24) = 13371 in conf/model/unetr.yaml's heads); measured on CPU in
benchmarks/RESULTS.md ("Op-level FP32 attention"). BF16 has FP32's range and is left alone.

How, per block:

- ``SABlock``: MONAI's own switch, ``attention_dtype=torch.float32`` (q and k cast before the product, softmax in
  FP32). MONAI then multiplies the FP32 probabilities with the FP16 ``v``, which torch refuses (``expected m1 and
  m2 to have the same dtype``), so they are handed back in ``v``'s dtype right after the softmax, at
  ``drop_weights`` (the dropout MONAI applies to them), as SwinUNETR's own code does with ``attn.to(v.dtype)``.
  Not with ``use_flash_attention`` (torch's fused kernel keeps its softmax in FP32 already).
- SwinUNETR's ``WindowAttention`` has no such switch: ``qkv``'s output is cast to FP32, so q.k^T, the relative
  position bias, the shift mask and the softmax run in FP32, and ``proj`` gets its input back in its own dtype.
"""

import weakref

import torch
from monai.networks.blocks.selfattention import SABlock
from monai.networks.nets.swin_unetr import WindowAttention
from torch import Tensor, nn

# blocks already given the hooks: a net converted twice (fit, then test) must not stack them
_DONE: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _v_projection(block: SABlock) -> nn.Module:
    return block.qkv if isinstance(block.qkv, nn.Linear) else block.to_v


def _sablock(block: SABlock) -> None:
    block.attention_dtype = torch.float32
    v_proj = _v_projection(block)

    def probabilities_to_v_dtype(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        # v's dtype is the projection's, looked up now: the block may have been promoted to FP32 since
        return output.to(v_proj.weight.dtype)

    block.drop_weights.register_forward_hook(probabilities_to_v_dtype)


def _window_attention(block: WindowAttention) -> None:
    block.qkv.register_forward_hook(lambda module, args, output: output.float())
    proj = block.proj
    block.proj.register_forward_pre_hook(lambda module, args: tuple(a.to(proj.weight.dtype) for a in args))


def attention_in_fp32(root: nn.Module) -> list[str]:
    """Run the attention logits and softmax of every ``SABlock`` (without flash attention) and ``WindowAttention``
    in ``root`` in FP32, in place (see the module docstring); returns the names of the blocks changed."""
    changed = []
    for name, module in root.named_modules():
        if isinstance(module, SABlock) and not module.use_flash_attention:
            if module not in _DONE:
                _sablock(module)
        elif isinstance(module, WindowAttention):
            if module not in _DONE:
                _window_attention(module)
        else:
            continue
        _DONE.add(module)
        changed.append(name)
    return changed
