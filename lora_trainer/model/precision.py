"""Frozen base weights stored smaller than they compute (`base_precision`), or off the GPU (`offload: blocks`).

Each Linear and Conv2d of the frozen UNet and text encoders keeps its weight in the storage dtype
(float8_e4m3fn for fp8) and, with offload, in CPU RAM, and casts (and copies) it to the compute
dtype and device only inside its own forward, layer by layer. The cast copy is not kept for the
backward pass: the storage weight is saved and cast again there, so a training step never holds a
full-precision copy of the model. (diffusers'
`enable_layerwise_casting` casts the same way, but autograd keeps every upcast weight alive until
backward: measured on the CPU, 8 fp8 layers of 4096² grew from 0.86 to 1.32 GB after one forward,
which for training is more than fp32 alone.) LoRA layers, norms, embeddings and biases stay in the
compute dtype; LoRA weights always in fp32. Offload moves one layer's weight at a time, in forward
and again in backward, rather than diffusers' group offloading, for the same reason: autograd would
keep every onloaded weight on the GPU until backward.
"""

from __future__ import annotations

import types
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

STORAGE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def storage_dtype(base_precision: str, compute: torch.dtype) -> torch.dtype:
    """The dtype frozen base weights are kept in. auto: the compute dtype (half on GPU, fp32 on CPU)."""
    if base_precision == "auto":
        return compute
    if base_precision == "fp8":
        if not hasattr(torch, "float8_e4m3fn"):
            raise ConfigError(f"base_precision: fp8 needs torch 2.1 or newer (this is torch {torch.__version__}). "
                              "Use base_precision: auto, fp16 or bf16.")
        return torch.float8_e4m3fn
    return STORAGE[base_precision]  # under fp32 compute (the CPU) fp16/bf16 are storage only


def load_dtype(storage: torch.dtype, compute: torch.dtype) -> torch.dtype:
    """The dtype to read the checkpoint in: the storage dtype, or for fp8 a half precision to quantize from
    (never fp32: the load would then hold a full-precision copy the run is meant to avoid)."""
    if storage in (torch.float32, torch.float16, torch.bfloat16):
        return storage
    return compute if compute in (torch.float16, torch.bfloat16) else torch.bfloat16


def quantized_dtype(storage: torch.dtype) -> Optional[torch.dtype]:
    """The storage dtype when it is smaller than any compute dtype (fp8): the loader quantizes into it part by
    part instead of holding the whole model in a half precision first."""
    return None if storage in STORAGE.values() else storage


def store_base_weights(models: Iterable[nn.Module], storage: torch.dtype, compute: torch.dtype,
                       offload: bool = False) -> int:
    """Keep every frozen Linear/Conv2d weight of `models` in `storage`, computing in `compute` (and, with
    `offload`, fetching it from wherever it lives); everything else of the base (norms, embeddings, biases) goes
    to `compute`. LoRA layers are left alone. Returns the layers whose forward casts or fetches."""
    stored = 0
    for model in models:
        for name, module in model.named_modules():
            if "lora_" in name:
                continue
            matrix = type(module) in (nn.Linear, nn.Conv2d)
            for pname, param in module.named_parameters(recurse=False):
                if param.requires_grad or not param.is_floating_point():
                    continue
                target = storage if matrix and pname == "weight" else compute
                if param.dtype != target:
                    param.data = param.data.to(target)
            if matrix and (storage != compute or offload) and not is_stored(module):
                module.forward = types.MethodType(_stored_forward, module)
                stored += 1
    return stored


def place_base_weights(model: nn.Module, device: torch.device, offload: bool) -> None:
    """Move `model` to `device`; with `offload`, its frozen Linear/Conv2d weights stay in (pinned) CPU RAM."""
    if not offload:
        model.to(device)
        return
    pin = device.type == "cuda"
    for name, module in model.named_modules():
        matrix = type(module) in (nn.Linear, nn.Conv2d) and "lora_" not in name
        for pname, param in module.named_parameters(recurse=False):
            if matrix and pname == "weight" and not param.requires_grad:
                cpu = param.data.to("cpu")
                param.data = cpu.pin_memory() if pin else cpu
            else:
                param.data = param.data.to(device)
        for bname, buf in module.named_buffers(recurse=False):
            module._buffers[bname] = buf.to(device)
    model._lora_trainer_offloaded = True


def compute_dtype_of(model: nn.Module) -> torch.dtype:
    """The dtype `model` computes in: its norms' (its Linear/Conv weights may be stored smaller)."""
    for module in model.modules():
        if isinstance(module, (nn.GroupNorm, nn.LayerNorm)) and module.weight is not None:
            return module.weight.dtype
    return next(model.parameters()).dtype


def is_offloaded(model: nn.Module) -> bool:
    """True for a model placed with offload: moving it whole (`.to(device)`) would undo that."""
    return bool(getattr(model, "_lora_trainer_offloaded", False))


def is_stored(module: nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return getattr(forward, "__func__", None) is _stored_forward


def compute_dtype_for(x: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for x's device, else x's own dtype."""
    kind = x.device.type
    try:
        if torch.is_autocast_enabled(kind):
            return torch.get_autocast_dtype(kind)
    except (TypeError, AttributeError):  # torch < 2.4 (A1111 1.10 ships 2.1)
        if kind == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        if kind == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
    return x.dtype


def _stored_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    bias = self.bias
    if isinstance(self, nn.Linear):
        return _StoredLinear.apply(x, self.weight, bias)
    if self.padding_mode != "zeros":
        raise NotImplementedError(f"padding_mode {self.padding_mode!r} with stored base weights")
    return _StoredConv2d.apply(x, self.weight, bias, self.stride, self.padding, self.dilation, self.groups)


def _fetch(weight: torch.Tensor, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` on `like`'s device in `dtype`: a temporary copy, dropped right after the layer's op."""
    return weight.to(device=like.device, dtype=dtype, non_blocking=True)


class _StoredLinear(torch.autograd.Function):
    """y = x Wᵀ + b with W cast from its storage dtype here and again in backward (W and b are frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        dtype = compute_dtype_for(x)
        ctx.save_for_backward(weight)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(dtype), _fetch(weight, x, dtype), None if bias is None else _fetch(bias, x, dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            grad_x = grad.to(ctx.dtype).matmul(_fetch(weight, grad, ctx.dtype))
        return grad_x.to(ctx.x_dtype), None, None


class _StoredConv2d(torch.autograd.Function):
    """A frozen Conv2d whose weight is cast from its storage dtype in forward and again in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        dtype = compute_dtype_for(x)
        ctx.save_for_backward(weight)
        ctx.conf = (x.shape, stride, padding, dilation, groups, dtype, x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            return F.conv2d(x.to(dtype), _fetch(weight, x, dtype), None if bias is None else _fetch(bias, x, dtype),
                            stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups, dtype, x_dtype = ctx.conf
        if isinstance(padding, str):
            raise NotImplementedError("string padding with stored base weights")
        with torch.autocast(grad.device.type, enabled=False):
            grad_x = torch.nn.grad.conv2d_input(shape, _fetch(weight, grad, dtype), grad.to(dtype), stride, padding,
                                                dilation, groups)
        return grad_x.to(x_dtype), None, None, None, None, None, None
