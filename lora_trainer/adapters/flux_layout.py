"""Flux.1 LoRAs in the layout Forge and ComfyUI load: the original model's module names, kohya-prefixed.

diffusers' `FluxTransformer2DModel` splits what the original (Black Forest Labs) model fuses: one
`double_blocks.N.img_attn.qkv` linear is diffusers' `to_q`, `to_k`, `to_v`; a single block's `linear1` is
`to_q`, `to_k`, `to_v` and `proj_mlp`. LoRAs on the split modules become one LoRA on the fused module,
exactly: the downs stacked, the ups block-diagonal (a module without a LoRA adds zero rows), and each
part's alpha / rank folded into its up, so the fused LoRA has alpha = its rank (scale 1).
Written as `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight` …, the names ComfyUI and Forge derive
from the original checkpoint's keys; CLIP-L (text encoder 1) as `lora_te1_…`.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import torch

from . import keymap
from ..errors import ModelError
from ..model.flux import SWAPPED, original_module

MLP_RATIO = 4  # Flux.1: proj_mlp is 4 × the width (for the rows of a proj_mlp without a LoRA)
_COMPONENT_PREFIXES = ("transformer.", "base_model.model.", "diffusion_model.")


def flux_to_kohya(parts: Mapping[str, Mapping[str, torch.Tensor]],
                  default_alpha: Optional[float] = None) -> Dict[str, torch.Tensor]:
    """LoRA parts keyed by diffusers module name (`transformer.transformer_blocks.0.attn.to_q`, CLIP-L as
    `text_encoder.…`; kohya names pass as they are) → kohya Flux tensors. `default_alpha`: for parts
    without one (peft/diffusers files), else alpha = rank."""
    fused: Dict[str, List[Tuple[int, Optional[Mapping[str, torch.Tensor]]]]] = {}
    out: Dict[str, torch.Tensor] = {}
    unknown = []
    for module, p in parts.items():
        if "down" not in p or "up" not in p:
            continue
        if "magnitude" in p or "dora_scale" in p:
            raise ModelError(f"{module} is a DoRA module: Flux.1 DoRA files are not converted yet (LoRA only).")
        if module.startswith(("lora_unet_", "lora_te")):
            out.update(_kohya(module, p["down"], p["up"], _alpha(p, default_alpha)))
        elif module.startswith("text_encoder."):
            name = keymap.kohya_name("lora_te1", module[len("text_encoder."):])
            out.update(_kohya(name, p["down"], p["up"], _alpha(p, default_alpha)))
        else:
            target = original_module(_strip(module))
            if target is None:
                unknown.append(module)
                continue
            original, index, count = target
            fused.setdefault(original, [(0, None)] * count)[index] = (1, p)
    if unknown:
        shown = ", ".join(sorted(unknown)[:3])
        raise ModelError(f"These LoRA modules are not part of a Flux.1 transformer: {shown}"
                         f"{' …' if len(unknown) > 3 else ''}.")
    for original, members in fused.items():
        down, up = _fuse(original, [p for _, p in members], default_alpha)
        out.update(_kohya(f"lora_unet_{original.replace('.', '_')}", down, up, torch.tensor(float(down.shape[0]))))
    return out


def _fuse(original: str, members: List[Optional[Mapping[str, torch.Tensor]]],
          default_alpha: Optional[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    present = [p for p in members if p is not None]
    width = present[0]["down"].shape[1]
    dtype = present[0]["up"].dtype
    downs, ups = [], []
    for i, p in enumerate(members):
        if p is None:  # no LoRA on this part: its rows of the fused update stay zero
            rows = MLP_RATIO * width if original.endswith("linear1") and i == 3 else width
            ups.append(torch.zeros(rows, 0, dtype=dtype))
            continue
        rank = p["down"].shape[0]
        up = p["up"].float() * (float(_alpha(p, default_alpha)) / rank)
        if original == SWAPPED:
            half = up.shape[0] // 2
            up = torch.cat([up[half:], up[:half]])
        downs.append(p["down"].float())
        ups.append(up)
    return torch.cat(downs).to(dtype), torch.block_diag(*ups).to(dtype)


def _alpha(p: Mapping[str, torch.Tensor], default_alpha: Optional[float]) -> torch.Tensor:
    if "alpha" in p:
        return p["alpha"].reshape(())
    return torch.tensor(float(default_alpha or p["down"].shape[0]))


def _kohya(name: str, down: torch.Tensor, up: torch.Tensor, alpha: torch.Tensor) -> Dict[str, torch.Tensor]:
    return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": alpha.reshape(())}


def _strip(module: str) -> str:
    for prefix in _COMPONENT_PREFIXES:
        if module.startswith(prefix):
            return module[len(prefix):]
    return module
