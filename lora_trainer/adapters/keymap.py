"""One key map, both directions: our modules ⇄ kohya LoRA keys, and foreign LoRA keys → ours.

A1111, Forge and ComfyUI load LoRAs in kohya's layout: `lora_unet_<module path with _>` and
`lora_te_…` (SDXL: `lora_te1_…`/`lora_te2_…`), each with `.lora_down.weight`, `.lora_up.weight`
and `.alpha`. The module path is the diffusers name for the UNet and the CLIP name with its
`text_model.` level for the text encoders. transformers 5 drops that level from CLIPTextModel
(CLIPTextModelWithProjection keeps it), so names are made canonical here and never depend on
the installed transformers.

Going back (kohya → module) is ambiguous from the string alone (underscores are both
separators and part of names), so it is resolved against the model's own module names.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .lycoris import ALL_PARTS

UNET_PREFIX = "lora_unet"
TEXT_PREFIX = "text_model."


def text_encoder_prefixes(family: str, count: int) -> List[str]:
    """kohya prefixes of the text encoders, in the order the model lists them."""
    return ["lora_te1", "lora_te2"] if family == "sdxl" or count == 2 else ["lora_te"]


def named_models(components: Any) -> List[Tuple[str, Any]]:
    """(kohya prefix, model) for the UNet and each text encoder."""
    tes = list(components.text_encoders)
    return [(UNET_PREFIX, components.unet)] + list(zip(text_encoder_prefixes(components.family, len(tes)), tes))


def canonical_module_name(prefix: str, module_name: str) -> str:
    """The module path kohya names are built from (text encoders always with `text_model.`)."""
    if prefix != UNET_PREFIX and not module_name.startswith(TEXT_PREFIX):
        return TEXT_PREFIX + module_name
    return module_name


def kohya_name(prefix: str, module_name: str) -> str:
    """`down_blocks.0.attentions.0...to_q` → `lora_unet_down_blocks_0_attentions_0_..._to_q`."""
    return f"{prefix}_{canonical_module_name(prefix, module_name).replace('.', '_')}"


def reverse_table(prefix: str, module_names: Sequence[str]) -> Dict[str, str]:
    """kohya name → module name, for every module of one model."""
    return {kohya_name(prefix, n): n for n in module_names}


# -- reading LoRA files written by other tools ----------------------------------------------

_PART_ALIASES = {
    "lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha",
    "lora_A.weight": "down", "lora_B.weight": "up",
    "lora_A.default.weight": "down", "lora_B.default.weight": "up",
    "lora.down.weight": "down", "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up",
    # DoRA: kohya/LyCORIS `dora_scale` as written; peft's magnitude, shaped its own way (export.to_kohya)
    "dora_scale": "dora_scale", "lora_magnitude_vector": "magnitude", "lora_magnitude_vector.weight": "magnitude",
    "lora_magnitude_vector.default": "magnitude", "lora_magnitude_vector.default.weight": "magnitude",
}
# LoHa/LoKr: LyCORIS's part names, which peft uses too (`.default` in a model's own state dict)
_PART_ALIASES.update({alias: part for part in ALL_PARTS for alias in (part, f"{part}.default")})
# diffusers / peft component prefixes → kohya prefixes (SD1/SD2 vs SDXL decided by the caller).
_FOREIGN_COMPONENTS = (
    ("base_model.model.", "unet"),
    ("unet.", "unet"),
    ("text_encoder_2.", "te2"),
    ("text_encoder.", "te1"),
    ("te2.", "te2"),
    ("te1.", "te1"),
)


def family_of_keys(keys: Sequence[str]) -> Optional[str]:
    """The family a LoRA's key names alone give away ("flux", "sdxl"), else None: kohya's Flux names, or diffusers'
    Flux transformer blocks with or without a component prefix (transformer., base_model.model., diffusion_model.)."""
    flux_blocks = ("transformer_blocks.", "single_transformer_blocks.")
    flux = tuple(p + b for p in ("", "transformer.", "base_model.model.", "diffusion_model.") for b in flux_blocks)
    if any(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_", *flux)) for k in keys):
        return "flux"
    if any(k.startswith(("lora_te2_", "text_encoder_2.", "te2.")) for k in keys):
        return "sdxl"
    return None


def split_lora_key(key: str) -> Optional[Tuple[str, str]]:
    """`<module>.<part>` → (module, part in down/up/alpha/dora_scale/magnitude or a LoHa/LoKr factor), for any of the
    known spellings."""
    for suffix in sorted(_PART_ALIASES, key=len, reverse=True):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], _PART_ALIASES[suffix]
    for part in ("down", "up"):  # old diffusers processors: `attn1.processor.to_q_lora.down.weight`
        if key.endswith(f"_lora.{part}.weight"):
            return key[: -len(f".{part}.weight")], part
    return None


def foreign_to_kohya(module: str, te_prefixes: Sequence[str]) -> Optional[str]:
    """A peft/diffusers module key (`unet.down_blocks.0...to_q`) → its kohya module name.

    Old diffusers attention-processor names (`attn1.processor.to_q_lora`) are folded back to
    the module they adapt.
    """
    if module.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")):
        return module
    module = re.sub(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$", lambda m: "." + m.group(1), module)
    if module.endswith(".to_out"):
        module += ".0"
    for start, component in _FOREIGN_COMPONENTS:
        if module.startswith(start):
            rest = module[len(start):]
            if component == "unet":
                return kohya_name(UNET_PREFIX, rest)
            index = 0 if component == "te1" else 1
            if index >= len(te_prefixes):
                return None
            return kohya_name(te_prefixes[index], rest)
    if module.startswith(("down_blocks.", "up_blocks.", "mid_block.", "conv_in", "conv_out", "time_embedding")):
        return kohya_name(UNET_PREFIX, module)  # a bare diffusers UNet name
    return None
