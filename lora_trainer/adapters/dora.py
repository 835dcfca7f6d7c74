"""DoRA per input column, the layout every host applies exactly, and the weight the hosts make of a DoRA file.

A DoRA layer here learns a magnitude m per INPUT column of W: W' = (W + ΔW) · m / ‖(W + ΔW)[:, j]‖, the norm
taken over each input column (a conv's: over out × k × k for each input channel), ΔW = alpha/rank · up @ down.
It is saved as `<module>.dora_scale` = m shaped (1, in) or (1, in, 1, 1) (LyCORIS `wd_on_output=False`, the
layout kohya-era DoRA files have). The hosts, read at the commits research/hosts.md names:

- AUTOMATIC1111 1.10.1 (`extensions-builtin/Lora/network.py` `NetworkModule.apply_weight_decompose`) always
  normalises input columns of W + ΔW: exact for this layout (and wrong for an output-axis one).
- ComfyUI 0.8.0 (`comfy/weight_adapter/base.py` `weight_decompose`) and Forge (`backend/patcher/lora.py`
  `weight_decompose`) tell the axis by `dora_scale.shape[0] == out`; on the input axis they take the norm of
  W + ΔW: exact. (On the output axis, peft's and newer LyCORIS's layout, they divide by ‖W‖ instead.)

Every host applies a DoRA file at strength S as W + S · (W' − W). peft trains only the output axis, so a layer
here is peft's plain LoRA with its input scaled: W'x = (W + ΔW)(s ⊙ x), s = m / ‖W + ΔW‖ per column (the norm
detached, as the DoRA paper and peft do; zero padding keeps it exact for convs), and at strength S
W x + S · (W' − W) x = W ((1 + S(s − 1)) ⊙ x) + S · ΔW (s ⊙ x): the base layer's input scaled by 1 + S(s − 1),
the LoRA path's by s, peft's scaling carrying S as for a plain LoRA. `InputMagnitude` owns m and these hooks on
its own layer; nothing global changes.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

EPS = torch.finfo(torch.float32).eps


def column_norms(merged: torch.Tensor) -> torch.Tensor:
    """The norm of each input column of a weight, (in,): a conv's over its out × k × k values."""
    return merged.transpose(0, 1).flatten(1).norm(dim=1)


class InputMagnitude(nn.Module):
    """The magnitude m (fp32, one per input column) of one peft LoRA layer, and the hooks that apply it.

    Registered on the layer as `lora_input_magnitude`, so m is one of the model's parameters (the optimizer, DDP
    and `lora_parameters` see it). m starts as the column norms of W, so s = 1 and the layer is the base."""

    def __init__(self, layer: nn.Module, adapter: str):
        super().__init__()
        self.adapter = adapter
        self.strength = 1.0
        self._scale: Optional[torch.Tensor] = None  # s during one forward of the layer
        self._channels = -3 if layer.get_base_layer().weight.dim() == 4 else -1  # a conv input's C of (N, C, H, W)
        self.weight = nn.Parameter(column_norms(layer.get_base_layer().weight.detach().float()))

    def attach(self, layer: nn.Module) -> None:
        layer.register_forward_pre_hook(self._compute_scale)
        layer.register_forward_hook(self._forget_scale)
        layer.get_base_layer().register_forward_pre_hook(self._scale_base_input)
        layer.lora_A[self.adapter].register_forward_pre_hook(self._scale_lora_input)

    def merged_weight(self, layer: nn.Module) -> torch.Tensor:
        """W + ΔW (strength 1) in fp32 whatever dtype the base weight is stored in, transient, without gradient."""
        weight = layer.get_base_layer().weight
        with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
            down, up = layer.lora_A[self.adapter].weight, layer.lora_B[self.adapter].weight
            delta = (up.float().flatten(1) @ down.float().flatten(1)).reshape(weight.shape)
            return weight.float() + layer.lora_alpha[self.adapter] / layer.r[self.adapter] * delta

    def effective_weight(self, layer: nn.Module, strength: float = 1.0) -> torch.Tensor:
        """W + S · (W' − W), the weight a host makes of this layer's file at strength S (for tests and checks)."""
        weight, merged = layer.get_base_layer().weight.detach().float(), self.merged_weight(layer)
        s = self.weight.detach() / column_norms(merged).clamp_min(EPS)
        return weight + strength * (merged * s.reshape(1, -1, *[1] * (weight.dim() - 2)) - weight)

    def _compute_scale(self, layer: nn.Module, args) -> None:
        # clamp, not + eps: s is exactly 1 at the start (m = the norms), and a zero column stays zero, never NaN
        self._scale = self.weight / column_norms(self.merged_weight(layer)).clamp_min(EPS).to(self.weight.device)

    def _forget_scale(self, layer: nn.Module, args, output) -> None:
        self._scale = None

    def _scale_base_input(self, base: nn.Module, args):
        if self._scale is None or self.strength == 0.0:  # strength 0: the base layer exactly
            return None
        s = self._scale if self.strength == 1.0 else 1.0 + self.strength * (self._scale - 1.0)
        return (ScaleChannels.apply(args[0], s, self._channels), *args[1:])

    def _scale_lora_input(self, lora_a: nn.Module, args):
        if self._scale is None:
            return None
        return (ScaleChannels.apply(args[0], self._scale, self._channels), *args[1:])


class ScaleChannels(torch.autograd.Function):
    """x ⊙ s over one channel dim, multiplied in fp32 and rounded once to x's dtype. Under fp16/bf16 autocast, s cast
    to half first would lose what training changes (bf16 steps by 0.008 near 1, a magnitude's updates are smaller);
    the fp32 product is only rounded as any activation is. Backward keeps x as it came, not an fp32 copy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, s: torch.Tensor, dim: int) -> torch.Tensor:
        ctx.save_for_backward(x, s)
        ctx.dim = dim
        return (x.to(torch.promote_types(x.dtype, s.dtype)) * _along(s, dim)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, s = ctx.saved_tensors
        wide = grad.to(torch.promote_types(grad.dtype, s.dtype))
        grad_x = (wide * _along(s, ctx.dim)).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            grad_s = (wide * x.to(wide.dtype)).movedim(ctx.dim, -1).reshape(-1, s.shape[0]).sum(0).to(s.dtype)
        return grad_x, grad_s, None


def _along(s: torch.Tensor, dim: int) -> torch.Tensor:
    return s.reshape(-1, *[1] * (-dim - 1))


def add_input_magnitude(layer: nn.Module, adapter: str) -> InputMagnitude:
    magnitude = InputMagnitude(layer, adapter)
    layer.lora_input_magnitude = magnitude
    magnitude.attach(layer)
    return magnitude


def kohya_scale(magnitude: torch.Tensor, weight_dim: int) -> torch.Tensor:
    """peft's output-axis magnitude ((out,) for Linear, (1, out, 1, 1) for Conv2d) as kohya's (out, 1[, 1, 1])."""
    return magnitude.reshape(-1, *[1] * (weight_dim - 1))


def input_scale(magnitude: torch.Tensor, weight_dim: int) -> torch.Tensor:
    """Our input-axis magnitude (in,) as kohya's (1, in[, 1, 1]) dora_scale."""
    return magnitude.reshape(1, -1, *[1] * (weight_dim - 2))


def on_input_axis(dora_scale: torch.Tensor, in_features: int) -> bool:
    """Whether a dora_scale holds one magnitude per input column ((1, in, …)), as ComfyUI tells the axis apart."""
    return dora_scale.shape[0] == 1 and dora_scale.numel() == in_features


def decomposed(weight: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor,
               strength: float = 1.0) -> torch.Tensor:
    """W + S · (dora_scale · (W + ΔW) / ‖W + ΔW‖ − W), the norm over output rows or input columns as
    dora_scale's shape says (ComfyUI's test), taken of W + ΔW on both axes (LyCORIS, peft; the hosts on the input
    axis)."""
    merged = weight + delta
    if dora_scale.shape[0] == weight.shape[0]:
        norm = merged.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
    else:
        norm = column_norms(merged).reshape(1, -1, *[1] * (weight.dim() - 2))
    norm = norm + EPS  # LyCORIS and the hosts: an all-zero row stays zero, never NaN
    return weight + strength * (merged * dora_scale.reshape(norm.shape) / norm - weight)
