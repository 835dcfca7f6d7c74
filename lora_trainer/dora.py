"""DoRA: peft's magnitudes ⇄ kohya's `dora_scale`, and the weight the hosts make of a DoRA file.

peft's DoRA (`use_dora`) keeps a magnitude m per output channel: W' = m · (W + ΔW) / ‖W + ΔW‖, the norm
taken over each output row (a conv's: its in × k × k kernel), ΔW = alpha/rank · up @ down. LyCORIS writes
that m as `<module>.dora_scale` shaped (out, 1) or (out, 1, 1, 1) (`wd_on_output`, its default since
2025-04; lycoris/modules/locon.py `apply_weight_decompose`): the layout written here. Older LyCORIS files hold
(1, in, …): a magnitude per input column, normalised over each column. (diffusers' SD and SDXL pipelines drop
dora_scale with a warning.) The hosts, read at the commits research/hosts.md names:

- ComfyUI 0.8.0 (`comfy/weight_adapter/base.py` `weight_decompose`) and Forge (`backend/patcher/lora.py`
  `weight_decompose`) tell the axis by `dora_scale.shape[0] == out`; on the output axis they divide by the
  norm of W rather than of W + ΔW, so there a file gives W' · ‖W + ΔW‖ / ‖W‖ per row (ΔW ≪ W: close to 1).
- AUTOMATIC1111 1.10.1 (`extensions-builtin/Lora/network.py` `NetworkModule.apply_weight_decompose`)
  always normalises input columns: an output-axis dora_scale broadcasts into an (out, in) scale there and
  distorts the layer, so DoRA is not for A1111.

Every host applies a DoRA file at strength S as W + S · (W' − W), so sampling here does the same.
"""

from __future__ import annotations

import re
import types
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn

from .errors import ConfigError

COMPUTABLE = (torch.float32, torch.float16, torch.bfloat16)
PEFT_NEEDED = (0, 10)  # peft 0.9 has use_dora for Linear layers only; 0.10 adds Conv2d
_STRENGTH = "_lora_trainer_strength"


def require_peft() -> None:
    import peft

    if tuple(int(n) for n in re.findall(r"\d+", peft.__version__)[:2]) < PEFT_NEEDED:
        raise ConfigError(f"lora_type: dora needs peft >= {'.'.join(map(str, PEFT_NEEDED))} (this is peft "
                          f"{peft.__version__}). Use lora_type: lora, or a newer peft.")


@contextmanager
def norm_readable(weights: Iterable[nn.Parameter]) -> Iterator[None]:
    """peft's DoRA takes each weight's norm as it wraps a layer, which float8 cannot: meanwhile a float8 weight
    shows peft a zero-size fp32 stand-in (`start` then reads the real weight, one layer at a time)."""
    swapped = []
    for weight in weights:
        if weight.dtype not in COMPUTABLE:
            swapped.append((weight, weight.data))
            weight.data = torch.zeros((), device=weight.device).expand(weight.shape)
    try:
        yield
    finally:
        for weight, data in swapped:
            weight.data = data


def start(dora: nn.Module, weight: torch.Tensor) -> None:
    """DoRA starts as the identity: m = the norm of each output row of W (up is zero), taken in fp32 whatever the
    base's dtype. From now on its output goes through the strength hook, and a float8 base weight reaches it cast."""
    with torch.no_grad():
        dora.weight.copy_(weight.float().flatten(1).norm(dim=1).reshape_as(dora.weight))
    if not hasattr(dora, _STRENGTH):
        setattr(dora, _STRENGTH, 1.0)
        dora.register_forward_hook(_at_strength)
        dora.register_forward_pre_hook(_computable_base, with_kwargs=True)


def set_strength(dora: nn.Module, strength: float) -> None:
    setattr(dora, _STRENGTH, strength)


def _at_strength(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    # peft's DoRA module returns (W' - W)·x, so scaling it is the hosts' W + S·(W' - W).
    strength = getattr(module, _STRENGTH)
    return output if strength == 1.0 else output * strength


def _computable_base(module: nn.Module, args, kwargs):
    """peft's DoRA conv computes with its base layer's weight as stored, which fails for float8 (base_precision: fp8)
    and for a stored dtype other than the input's: it is shown the layer with its weight cast to the input's dtype,
    as the stored forward casts it (peft's DoRA Linear casts so itself)."""
    base = kwargs.get("base_layer")
    x = args[0] if args else kwargs.get("x")
    if base is None or x is None or base.weight.dtype == x.dtype:
        return None
    shown = types.SimpleNamespace(weight=base.weight.to(x.device, x.dtype), bias=base.bias,
                                  **{k: getattr(base, k) for k in ("stride", "padding", "dilation", "groups")
                                     if hasattr(base, k)})
    return args, {**kwargs, "base_layer": shown}


def kohya_scale(magnitude: torch.Tensor, weight_dim: int) -> torch.Tensor:
    """peft's magnitude ((out,) for Linear, (1, out, 1, 1) for Conv2d) as kohya's (out, 1[, 1, 1]) dora_scale."""
    return magnitude.reshape(-1, *[1] * (weight_dim - 1))


def decomposed(weight: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor,
               strength: float = 1.0) -> torch.Tensor:
    """W + S · (dora_scale · (W + ΔW) / ‖W + ΔW‖ − W), the norm over output rows or input columns as
    dora_scale's shape says (ComfyUI's test), taken of W + ΔW on both axes (LyCORIS, peft)."""
    merged = weight + delta
    if dora_scale.shape[0] == weight.shape[0]:
        norm = merged.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
    else:
        norm = merged.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (weight.dim() - 2))
    norm = norm + torch.finfo(norm.dtype).eps  # LyCORIS and the hosts: an all-zero row stays zero, never NaN
    return weight + strength * (merged * dora_scale.reshape(norm.shape) / norm - weight)
