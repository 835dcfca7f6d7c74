"""Flux.1 LoRAs in the layout Forge and ComfyUI load: the original model's module names, kohya-prefixed.

diffusers' `FluxTransformer2DModel` splits what the original (Black Forest Labs) model fuses: one
`double_blocks.N.img_attn.qkv` linear is diffusers' `to_q`, `to_k`, `to_v`; a single block's `linear1` is
`to_q`, `to_k`, `to_v` and `proj_mlp`. LoRAs on the split modules become one LoRA on the fused module,
exactly: the downs stacked, the ups block-diagonal (a module without a LoRA adds zero rows), and each
part's alpha / rank folded into its up, so the fused LoRA has alpha = its rank (scale 1).
Written as `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight` …, the names ComfyUI and Forge derive
from the original checkpoint's keys; CLIP-L (text encoder 1) as `lora_te1_…`.

`kohya_to_split` goes back, for continuing from a file (`init_lora`): a fused LoRA whose up is block-diagonal
(ours) gives each part its own block, exactly; any other (kohya's trainer shares one down across q, k, v)
gives each part the whole down and its rows of the up — the same update either way.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import torch

from . import keymap
from ..errors import ModelError
from ..model.flux import MLP_RATIO, SWAPPED, original_module, split_module

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


def kohya_to_split(kohya: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """kohya Flux tensors (original fused module names) → kohya names of diffusers' split modules
    (`lora_unet_transformer_blocks_0_attn_to_q…`), the names training wraps; text encoders' keys pass as they are."""
    out: Dict[str, torch.Tensor] = {}
    modules = sorted({k.split(".", 1)[0] for k in kohya})
    for module in modules:
        parts = split_module(module[len("lora_unet_"):]) if module.startswith("lora_unet_") else None
        if parts is None:  # CLIP-L's, and names that are diffusers' already (loading names what is unknown)
            out.update({k: v for k, v in kohya.items() if k.split(".", 1)[0] == module})
            continue
        down, up = kohya[f"{module}.lora_down.weight"], kohya[f"{module}.lora_up.weight"]
        rank = down.shape[0]
        alpha = float(kohya[f"{module}.alpha"]) if f"{module}.alpha" in kohya else float(rank)
        if module.endswith(SWAPPED.replace(".", "_")):
            half = up.shape[0] // 2
            up = torch.cat([up[half:], up[:half]])
        rows = [up[start:stop] for start, stop in _row_blocks(parts, up.shape[0])]
        columns = [set(torch.nonzero(r.abs().sum(0)).flatten().tolist()) for r in rows]
        blocks = _blocks(columns, rank, len(parts))
        for (name, _), row, cols in zip(parts, rows, blocks):
            if cols is not None and not cols:
                continue  # a part without a LoRA of its own (only zero rows in the fused up)
            index = torch.tensor(sorted(cols)) if cols is not None else torch.arange(rank)
            part_rank = len(index)
            key = keymap.kohya_name(keymap.UNET_PREFIX, name)
            out[f"{key}.lora_down.weight"] = down[index].contiguous()
            out[f"{key}.lora_up.weight"] = row[:, index].contiguous()
            out[f"{key}.alpha"] = torch.tensor(alpha * part_rank / rank)  # the same update: alpha/rank kept
    return out


def _row_blocks(parts: List[Tuple[str, int]], rows: int) -> List[Tuple[int, int]]:
    """Each part's rows of the fused output: in widths (linear1: q, k, v, then the MLP's MLP_RATIO widths)."""
    units = sum(share for _, share in parts)
    width = rows // units
    spans, start = [], 0
    for _, share in parts:
        spans.append((start, start + share * width))
        start += share * width
    return spans


def _blocks(columns: List[set], rank: int, count: int) -> List[Optional[set]]:
    """Per part, the down rows (up columns) that are its own when the fused up is block-diagonal, else None each
    (every part then takes the whole down). A wholly zero up (untrained) is split into equal blocks when it can."""
    if count == 1:
        return [None]
    union = set().union(*columns)
    disjoint = sum(len(c) for c in columns) == len(union)
    if union and disjoint:
        return columns
    if not union and rank % count == 0:
        size = rank // count
        return [set(range(i * size, (i + 1) * size)) for i in range(count)]
    return [None] * count
