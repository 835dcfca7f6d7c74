"""What one UNet training step keeps for its backward pass, counted on the meta device (no memory used).

The UNet of the shipped architecture is built on the meta device, LoRA is attached the way
`train()` attaches it, and one forward pass runs on meta tensors under autograd's saved-tensor
hooks: every tensor the backward pass will need is seen once, with its size. Weights are not
activations and are left out. Attention is counted as the fused kernels that training uses on both
CPU and GPU keep it (query, key, value, output and one value per row), not as the materialised
attention matrix that a meta-device run would otherwise record.

With gradient checkpointing, diffusers keeps only the inputs of each ResNet and transformer block
and recomputes one block at a time in backward: kept = what lies outside the blocks + every block's
input + the largest block's own share.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn


class _FusedAttentionCount(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention on meta tensors: keeps what the fused kernels keep."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the count needs the forward pass only
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


class _CountingAttnProcessor:
    """diffusers' attention (the UNet's self- and cross-attention) with the fused-kernel count above."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Any = None, temb: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        b, heads = q.shape[0], attn.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)

        out = _FusedAttentionCount.apply(split(q), split(k), split(v))
        out = out.transpose(1, 2).reshape(b, -1, heads * out.shape[-1])
        return attn.to_out[1](attn.to_out[0](out))


def _units(unet: nn.Module) -> List[nn.Module]:
    """The modules diffusers checkpoints one by one: ResNet blocks and transformer blocks."""
    names = ("ResnetBlock2D", "BasicTransformerBlock")
    return [m for m in unet.modules() if type(m).__name__ in names]


def count_saved(family: str, variant: str, targets: List[str], rank: int, conv_rank: int, resolution: int,
                batch: int, dtype_name: str, checkpointing: bool, dropout: bool) -> Tuple[int, int]:
    """(bytes kept for backward, bytes of the largest kept tensor) of one training forward pass of the UNet."""
    from ..adapters.lora import UNET_TARGETS, add_lora, resolve_targets
    from ..model.shipped import load_configs

    dtype = getattr(torch, dtype_name.removeprefix("torch."))
    unet = nn.Module.to(copy.deepcopy(meta_unet(family, variant)), dtype)  # diffusers' .to() warns on casts
    add_lora(unet, resolve_targets(unet, targets, UNET_TARGETS), rank, rank, 0.1 if dropout else 0.0, conv_rank)
    unet.set_attn_processor(_CountingAttnProcessor())
    weights = {id(p) for p in unet.parameters()}
    config = load_configs(family, variant)["unet"]
    side = resolution // 8
    kept: Dict[int, Tuple[torch.Tensor, Any]] = {}  # id → (tensor, the block it was kept in or None)
    stack: List[nn.Module] = []
    inputs: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t if t._base is None else t._base  # linear keeps a transposed view of its weight
        if id(base) not in weights and id(t) not in kept:
            kept[id(t)] = (t, stack[0] if stack else None)  # the outermost block recomputes it
        return t

    def enter(module: nn.Module, args: tuple) -> None:
        if not stack:
            inputs[id(module)] = inputs.get(id(module), 0) + sum(_nbytes(a) for a in args[:1])
        stack.append(module)

    def leave(module: nn.Module, args: tuple, output: Any) -> None:
        stack.pop()

    hooks = []
    for unit in _units(unet):
        hooks.append(unit.register_forward_pre_hook(enter))
        hooks.append(unit.register_forward_hook(leave))
    with torch.device("meta"):
        sample = torch.empty(batch, config["in_channels"], side, side, dtype=dtype)
        text = torch.empty(batch, 77, config["cross_attention_dim"], dtype=dtype)
        added = None
        if config.get("addition_embed_type") == "text_time":
            added = {"text_embeds": torch.empty(batch, 1280, dtype=dtype), "time_ids": torch.empty(batch, 6, dtype=dtype)}
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            unet(sample, torch.zeros(batch, dtype=torch.long), encoder_hidden_states=text, added_cond_kwargs=added)
    for hook in hooks:
        hook.remove()
    per_unit: Dict[Optional[int], int] = {}
    for t, unit in kept.values():
        key = None if unit is None else id(unit)
        per_unit[key] = per_unit.get(key, 0) + _nbytes(t)
    outside = per_unit.pop(None, 0)
    largest = max((_nbytes(t) for t, _ in kept.values()), default=0)
    if not checkpointing:
        return outside + sum(per_unit.values()), largest
    return outside + sum(inputs.values()) + max(per_unit.values(), default=0), largest


def _nbytes(t: Any) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


_META: Dict[Tuple[str, str], nn.Module] = {}


def meta_unet(family: str, variant: str) -> nn.Module:
    from ..model import factory
    from ..model.shipped import load_configs

    if (family, variant) not in _META:
        with torch.device("meta"):
            _META[(family, variant)] = factory.build_unet(load_configs(family, variant)["unet"])
    return _META[(family, variant)]
