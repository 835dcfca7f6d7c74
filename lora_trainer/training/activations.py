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

Flux.1's transformer is counted the same way: its double and single blocks are the units, its
attention (diffusers' Flux processors call scaled_dot_product_attention) is swapped for the
fused-kernel count for the length of the pass, and its inputs are the packed latents and T5 tokens.
For Flux, `variant` is the JSON of the file's configs (plan.flux_architecture).
"""

from __future__ import annotations

import copy
import json
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


def _counting_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any,
                   **kwargs: Any) -> torch.Tensor:
    """scaled_dot_product_attention's signature (its callers name the arguments), counted as the fused kernels."""
    return _FusedAttentionCount.apply(query, key, value)


def _units(unet: nn.Module) -> List[nn.Module]:
    """The modules diffusers checkpoints one by one: ResNet and transformer blocks (Flux: double and single)."""
    names = ("ResnetBlock2D", "BasicTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock")
    return [m for m in unet.modules() if type(m).__name__ in names]


def _model_inputs(family: str, variant: str, resolution: int, batch: int, dtype: torch.dtype) -> Dict[str, Any]:
    """One training batch for the UNet (or Flux transformer) as the loop feeds it, on the meta device."""
    from ..model.shipped import load_configs

    side = resolution // 8
    if family == "flux":
        from ..model.flux import T5_MAX_LENGTH

        config = json.loads(variant)["transformer"]
        tokens, text = (side // 2) ** 2, T5_MAX_LENGTH["dev" if config["guidance_embeds"] else "schnell"]
        inputs = {"hidden_states": torch.empty(batch, tokens, config["in_channels"], dtype=dtype),
                  "encoder_hidden_states": torch.empty(batch, text, config["joint_attention_dim"], dtype=dtype),
                  "pooled_projections": torch.empty(batch, config["pooled_projection_dim"], dtype=dtype),
                  "timestep": torch.empty(batch, dtype=dtype), "img_ids": torch.zeros(tokens, 3),
                  "txt_ids": torch.zeros(text, 3), "return_dict": False}
        if config["guidance_embeds"]:
            inputs["guidance"] = torch.empty(batch, dtype=dtype)
        return inputs
    config = load_configs(family, variant)["unet"]
    added = None
    if config.get("addition_embed_type") == "text_time":
        added = {"text_embeds": torch.empty(batch, 1280, dtype=dtype), "time_ids": torch.empty(batch, 6, dtype=dtype)}
    return {"sample": torch.empty(batch, config["in_channels"], side, side, dtype=dtype),
            "timestep": torch.zeros(batch, dtype=torch.long),
            "encoder_hidden_states": torch.empty(batch, 77, config["cross_attention_dim"], dtype=dtype),
            "added_cond_kwargs": added}


def count_saved(family: str, variant: str, targets: List[str], rank: int, conv_rank: int, resolution: int,
                batch: int, dtype_name: str, checkpointing: bool, dropout: bool) -> Tuple[int, int]:
    """(bytes kept for backward, bytes of the largest kept tensor) of one training forward pass of the UNet."""
    from ..adapters.lora import add_lora, base_targets

    dtype = getattr(torch, dtype_name.removeprefix("torch."))
    unet = nn.Module.to(copy.deepcopy(meta_unet(family, variant)), dtype)  # diffusers' .to() warns on casts
    add_lora(unet, base_targets(unet, family, targets), rank, rank, 0.1 if dropout else 0.0, conv_rank)
    if family != "flux":
        unet.set_attn_processor(_CountingAttnProcessor())
    weights = {id(p) for p in unet.parameters()}
    kept: Dict[int, Tuple[torch.Tensor, Any]] = {}  # id → (tensor, the block it was kept in or None)
    stack: List[nn.Module] = []
    inputs: Dict[int, torch.Tensor] = {}  # id → each tensor a checkpointed block keeps as its input

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t if t._base is None else t._base  # linear keeps a transposed view of its weight
        if id(base) not in weights and id(t) not in kept:
            kept[id(t)] = (t, stack[0] if stack else None)  # the outermost block recomputes it
        return t

    def enter(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not stack:  # a tensor handed to every block (the time embedding, rotary tables) is kept once
            for t in _tensors([*args, *kwargs.values()]):
                inputs[id(t)] = t
        stack.append(module)

    def leave(module: nn.Module, args: tuple, output: Any) -> None:
        stack.pop()

    hooks = []
    for unit in _units(unet):
        hooks.append(unit.register_forward_pre_hook(enter, with_kwargs=True))
        hooks.append(unit.register_forward_hook(leave))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    try:
        torch.nn.functional.scaled_dot_product_attention = _counting_sdpa  # read at call time by diffusers
        with torch.device("meta"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            unet(**_model_inputs(family, variant, resolution, batch, dtype))
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
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
    return outside + sum(_nbytes(t) for t in inputs.values()) + max(per_unit.values(), default=0), largest


def _tensors(values: Any) -> List[torch.Tensor]:
    found: List[torch.Tensor] = []
    for v in values:
        if isinstance(v, torch.Tensor):
            found.append(v)
        elif isinstance(v, (tuple, list)):
            found += _tensors(v)
    return found


def _nbytes(t: Any) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


_META: Dict[Tuple[str, str], nn.Module] = {}


def meta_unet(family: str, variant: str) -> nn.Module:
    from ..model import factory
    from ..model.shipped import load_configs

    if (family, variant) not in _META:
        with torch.device("meta"):
            if family == "flux":
                from diffusers import FluxTransformer2DModel

                _META[(family, variant)] = FluxTransformer2DModel.from_config(json.loads(variant)["transformer"])
            else:
                _META[(family, variant)] = factory.build_unet(load_configs(family, variant)["unet"])
    return _META[(family, variant)]
