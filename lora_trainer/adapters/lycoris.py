"""LoHa and LoKr (`lora_type: loha | lokr`): peft's LoHa/LoKr layers, saved in the LyCORIS layout the hosts read.

peft's layers (`peft.tuners.loha`, `peft.tuners.lokr`) are LyCORIS's: the same factors, named the same
(`hada_w1_a`, `lokr_w1`, `lokr_w2_b`, …) and shaped the same, so a layer's parameters are written as they are,
`<kohya module>.<part>` plus `.alpha`. What a host makes of a module, read at the commits research/hosts.md
names (AUTOMATIC1111 1.10.1 `extensions-builtin/Lora/network_hada.py`, `network_lokr.py`, `network.py`
`calc_scale`; ComfyUI 0.8.0 `comfy/weight_adapter/loha.py`, `lokr.py`; Forge `backend/patcher/lora.py`):

- LoHa: ΔW = alpha / r · (w1_a @ w1_b) ⊙ (w2_a @ w2_b), r = w1_b's rows, reshaped to the weight (a conv's
  factors are 2-D, (out, r) and (r, in·k·k));
- LoKr: ΔW = alpha / r · kron(w1, w2), each factor whole (`lokr_w1`) or a product (`lokr_w1_a @ lokr_w1_b`), r the
  rows of w2_b if w2 is a product, else of w1_b; with both factors whole there is no rank and the scale is 1 (as
  LyCORIS trains such a "full" LoKr). A conv's whole w2 is 4-D (w1 takes two unit dims), a product stays 2-D.

Every host adds strength · ΔW. peft scales by alpha / r in every case, so each layer's `scaling` is set here to the
hosts' scale (`host_scale`) and what trains is exactly what the hosts apply. `lora_dropout` is peft's (and
LyCORIS's) rank dropout for these types.
"""

from __future__ import annotations

import functools
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from ..errors import ConfigError, ModelError

KINDS = ("loha", "lokr")
PARTS = {
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
}
ALL_PARTS = PARTS["loha"] + PARTS["lokr"]
THREE_BY_THREE = ("_conv1", "_conv2", "_conv", "_conv_in", "_conv_out")  # SD UNet convs with a 3×3 kernel


def kind_of(tensors: Mapping[str, object]) -> Optional[str]:
    """"loha" or "lokr" when a kohya-layout state dict holds LyCORIS factors, None for LoRA."""
    for kind, parts in PARTS.items():
        if any(k.rsplit(".", 1)[-1] in parts for k in tensors):
            return kind
    return None


def add_lycoris(model: nn.Module, kind: str, targets: List[str], rank: int, alpha: float, adapter: str,
                dropout: float = 0.0, conv_ranks: Optional[Dict[str, tuple]] = None, factor: int = -1,
                decompose_both: bool = False) -> None:
    """Wrap `targets` of `model` with peft LoHa/LoKr layers in fp32, starting at ΔW = 0 (peft zeroes one factor).

    `conv_ranks` maps a conv's short name to its (rank, alpha), peft's rank/alpha patterns."""
    from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model

    patterns = conv_ranks or {}
    common = dict(r=rank, alpha=alpha, rank_dropout=dropout, target_modules=targets, init_weights=True,
                  rank_pattern={c: r for c, (r, _) in patterns.items()},
                  alpha_pattern={c: a for c, (_, a) in patterns.items()})
    config = (LoHaConfig(**common) if kind == "loha" else
              LoKrConfig(**common, decompose_factor=factor, decompose_both=decompose_both))
    model.requires_grad_(False)
    inject_adapter_in_model(config, model, adapter_name=adapter)
    for layer in lycoris_layers(model, adapter).values():
        if any(p.dtype != torch.float32 for p in factors(layer, adapter).values()):  # peft takes the base's dtype
            for part, p in factors(layer, adapter).items():
                p.data = p.data.float()
            layer.reset_adapter_parameters(adapter)
        layer.scaling[adapter] = host_scale(layer, adapter)
    one_op_forward(model, adapter)


def one_op_forward(model: nn.Module, adapter: str) -> None:
    """Every LoHa/LoKr layer of `model` computes x·(W + ΔW)ᵀ in one op, as LyCORIS does, instead of peft's
    base(x) + x·ΔWᵀ: one big matmul fewer forward and one fewer backward (bench/train_step.py --lora-types); a base
    stored in fp8 or offloaded adds x·ΔWᵀ beside its own op."""
    import types

    for layer in lycoris_layers(model, adapter).values():
        layer.forward = types.MethodType(_one_op_forward, layer)


def _one_op_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    import torch.nn.functional as F

    from ..model.precision import compute_dtype_for, is_stored

    base = self.get_base_layer()
    active = [a for a in self.active_adapters if a in self.scaling]
    if self.disable_adapters or self.merged or len(active) != 1 or type(base) not in (nn.Linear, nn.Conv2d) \
            or args or kwargs:
        return type(self).forward(self, x, *args, **kwargs)
    dtype = compute_dtype_for(x)
    delta_weight = _delta_weight(self, active[0])

    def op(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if isinstance(base, nn.Linear):
            return F.linear(x.to(dtype), weight, bias)
        return F.conv2d(x.to(dtype), weight, bias, base.stride, base.padding, base.dilation, base.groups)

    if is_stored(base):  # fp8 or offloaded: the base casts its own weight per op, ΔW goes beside it
        return (base(x).to(dtype) + op(delta_weight.to(dtype), None)).to(x.dtype)
    weight = (base.weight.to(delta_weight.dtype) + delta_weight).to(dtype)
    return op(weight, None if base.bias is None else base.bias.to(dtype)).to(x.dtype)


def _delta_weight(layer: nn.Module, adapter: str) -> torch.Tensor:
    """The layer's scaled ΔW with rank dropout while training. Newer peft asks for the dropout; older peft (0.13,
    A1111's and Forge's) applies it by itself in train mode, and its LoKr leaves the scale out."""
    if _asks_for_dropout(type(layer)):
        return layer.get_delta_weight(adapter, apply_rank_dropout=layer.training and bool(layer.rank_dropout[adapter]))
    weight = layer.get_delta_weight(adapter)
    return weight * layer.scaling[adapter] if hasattr(layer, "lokr_w1") else weight


@functools.lru_cache(maxsize=None)
def _asks_for_dropout(layer_type: type) -> bool:
    """Once per layer class, not per forward: whether its get_delta_weight takes apply_rank_dropout."""
    import inspect

    return "apply_rank_dropout" in inspect.signature(layer_type.get_delta_weight).parameters


def check_factor(model: nn.Module, targets: Sequence[str], factor: int) -> None:
    """A `lokr_factor` must divide a dimension of at least one wrapped layer, or it means nothing."""
    if factor <= 0:
        return
    modules = dict(model.named_modules())
    dims = set()
    for name in targets:
        weight = modules[name].weight
        dims.update((weight.shape[0], weight.shape[1]))
    if not any(d % factor == 0 for d in dims):
        raise ConfigError(f"lokr_factor {factor} divides no dimension of the trained layers ({sorted(dims)[:6]}…): "
                          "use a power of two such as 4, 8 or 16, or -1 for factors as square as each layer allows.")


def lycoris_layers(model: nn.Module, adapter: str) -> Dict[str, nn.Module]:
    """Module name → peft LoHa/LoKr layer, for every such wrapped layer of `model`."""
    from peft.tuners.lycoris_utils import LycorisLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LycorisLayer) and adapter in m.scaling}


def factors(layer: nn.Module, adapter: str) -> Dict[str, nn.Parameter]:
    """The factors one layer holds, by LyCORIS part name (only those it has: a whole w1 or its product)."""
    return {part: getattr(layer, part)[adapter] for part in ALL_PARTS
            if part in getattr(layer, "adapter_layer_names", ()) and adapter in getattr(layer, part)}


def host_rank(parts: Mapping[str, torch.Tensor]) -> Optional[int]:
    """The r the hosts divide alpha by: LoHa's w1_b rows; LoKr's w2_b rows, else w1_b's; None for a whole LoKr."""
    for part in ("hada_w1_b", "lokr_w2_b", "lokr_w1_b"):
        if part in parts:
            return int(parts[part].shape[0])
    return None


def host_scale(layer: nn.Module, adapter: str) -> float:
    rank = host_rank(factors(layer, adapter))
    return float(layer.alpha[adapter]) / rank if rank else 1.0


def delta(parts: Mapping[str, torch.Tensor], alpha: Optional[float]) -> torch.Tensor:
    """ΔW of one module at strength 1 as the hosts compute it, flattened to (out, in·k·k) in fp32; `alpha` None (no
    `.alpha` in the file) scales by 1, as the hosts do."""
    p = {k: v.float() for k, v in parts.items()}
    rank = host_rank(p)
    scale = alpha / rank if alpha is not None and rank else 1.0
    if "hada_w1_a" in p:
        w1 = _product(p["hada_w1_a"], p["hada_w1_b"], p.get("hada_t1"))
        w2 = _product(p["hada_w2_a"], p["hada_w2_b"], p.get("hada_t2"))
        return (w1 * w2).flatten(1) * scale
    w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
    w2 = p["lokr_w2"] if "lokr_w2" in p else _product(p["lokr_w2_a"], p["lokr_w2_b"], p.get("lokr_t2"))
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2).flatten(1) * scale


def delta_shape(parts: Mapping[str, torch.Tensor]) -> tuple:
    """(out, in·k·k) of the ΔW a module's factors make, read from their shapes alone (nothing is multiplied)."""
    if "hada_w1_a" in parts:
        if "hada_t1" in parts:  # Tucker: w1_a (r, out), w1_b (r, in), the core (r, r, k, k)
            t = parts["hada_t1"]
            return parts["hada_w1_a"].shape[1], parts["hada_w1_b"].shape[1] * t.shape[2] * t.shape[3]
        return parts["hada_w1_a"].shape[0], parts["hada_w1_b"].flatten(1).shape[1]
    w1 = parts["lokr_w1"].shape if "lokr_w1" in parts else (parts["lokr_w1_a"].shape[0], parts["lokr_w1_b"].shape[1])
    if "lokr_w2" in parts:
        w2 = parts["lokr_w2"].shape[0], parts["lokr_w2"].flatten(1).shape[1]
    elif "lokr_t2" in parts:
        t = parts["lokr_t2"]
        w2 = parts["lokr_w2_a"].shape[1], parts["lokr_w2_b"].shape[1] * t.shape[2] * t.shape[3]
    else:
        w2 = parts["lokr_w2_a"].shape[0], parts["lokr_w2_b"].shape[1]
    return w1[0] * w2[0], w1[1] * w2[1]


def module_parts(tensors: Mapping[str, torch.Tensor], module: str) -> Dict[str, torch.Tensor]:
    """The LoHa/LoKr factors of one kohya module in a state dict (empty for a LoRA module)."""
    return {part: tensors[f"{module}.{part}"] for part in ALL_PARTS if f"{module}.{part}" in tensors}


def modules_of(tensors: Mapping[str, torch.Tensor]) -> List[str]:
    """The kohya modules a state dict holds LoHa/LoKr factors for."""
    return sorted({k.rsplit(".", 1)[0] for k in tensors if k.rsplit(".", 1)[-1] in ALL_PARTS})


def _product(a: torch.Tensor, b: torch.Tensor, tucker: Optional[torch.Tensor]) -> torch.Tensor:
    if tucker is None:
        return a.flatten(1) @ b.flatten(1)
    # Tucker (LyCORIS use_tucker): the core's two rank modes taken to out and in, as ComfyUI and Forge write it
    return torch.einsum("i j k l, j r, i p -> p r k l", tucker, b, a)


def kernel(module: str, parts: Mapping[str, torch.Tensor]) -> Optional[tuple]:
    """A conv module's (k, k), None for a linear one (or a 1×1 conv, which every host reads as 2-D): a 4-D factor
    says it; 2-D factors do not, so the SD UNet's names do (ResNet, sampler and in/out convs are its 3×3 ones)."""
    for tensor in parts.values():
        if tensor.dim() == 4 and tuple(tensor.shape[2:]) != (1, 1):
            return tuple(tensor.shape[2:])
    return (3, 3) if module.endswith(THREE_BY_THREE) else None


def load_into(model: nn.Module, kind: str, hits: Dict[str, str], kohya: Mapping[str, torch.Tensor],
              adapter: str, dropout: float = 0.0) -> None:
    """Wrap exactly the layers `hits` (module name → kohya module) names and give each the file's factors as they
    are, whatever rank or factorisation each was made with (peft's forward uses the factors a layer holds)."""
    first = {p: kohya[f"{next(iter(hits.values()))}.{p}"] for p in PARTS[kind]
             if f"{next(iter(hits.values()))}.{p}" in kohya}
    add_lycoris(model, kind, list(hits), host_rank(first) or 1, 1.0, adapter, dropout)
    layers = lycoris_layers(model, adapter)
    with torch.no_grad():
        for module_name, key in hits.items():
            layer = layers[module_name]
            device = next(iter(factors(layer, adapter).values())).device
            for part in PARTS[kind]:
                store = getattr(layer, part)
                tensor = kohya.get(f"{key}.{part}")
                if tensor is None:
                    if adapter in store:
                        del store[adapter]
                else:
                    store[adapter] = nn.Parameter(tensor.detach().to(device, torch.float32).clone())
            found = factors(layer, adapter)
            if not any(p.startswith(("hada_w1", "lokr_w1")) for p in found) or \
                    not any(p.startswith(("hada_w2", "lokr_w2")) for p in found):
                raise ModelError(f"{key}: a {kind} module needs both of its factors; this file lacks one.")
            alpha = kohya.get(f"{key}.alpha")
            layer.alpha[adapter] = float(alpha) if alpha is not None else float(host_rank(found) or 1)
            layer.scaling[adapter] = host_scale(layer, adapter)


def network_args(kind: str, cfg) -> Dict[str, str]:
    """`ss_network_args` as LyCORIS's kohya network module records them (strings), for a run's config."""
    args = {"algo": kind}
    if cfg.conv_rank:
        args.update(conv_dim=str(cfg.conv_rank), conv_alpha=str(cfg.conv_alpha or cfg.lora_alpha))
    if kind == "lokr":
        args.update(factor=str(cfg.lokr_factor), decompose_both=str(cfg.decompose_both))
    if cfg.lora_dropout:
        args["rank_dropout"] = str(cfg.lora_dropout)
    return args
