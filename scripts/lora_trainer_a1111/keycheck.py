"""Would A1111's Lora extension match every key of a LoRA file? It drops the ones it cannot at DEBUG level.

A1111 (extensions-builtin/Lora/networks.py, 1.10) names each module of the loaded model by its
path with '.' → '_' (the text encoder below its `.wrapped` level), turns a file's kohya/diffusers
key into that naming (`convert_diffusers_name_to_compvis`), and falls back to a plain
`lora_unet` → `diffusion_model` / `lora_te1_text_model` → `0_transformer_text_model` swap. This is
a table-driven re-statement of those rules (written from reading that source, not copied) for
tests and for hosts where the function cannot be imported; in the WebUI `unmatched_keys` is
given the host's own converter.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, List, Optional, Set

RESNET_SUFFIX = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                 "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}
OPEN_CLIP_PARTS = (("mlp_fc1", "mlp_c_fc"), ("mlp_fc2", "mlp_c_proj"), ("self_attn", "attn"))  # HF CLIP → open_clip
_X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")  # q/k/v of open_clip's fused in_proj: the attention module itself
# (pattern, builder) tried in order; the builder gets the match groups.
_UNET_RULES = [
    (r"lora_unet_conv_in(.*)", lambda g: f"diffusion_model_input_blocks_0_0{g[0]}"),
    (r"lora_unet_conv_out(.*)", lambda g: f"diffusion_model_out_2{g[0]}"),
    (r"lora_unet_time_embedding_linear_(\d+)(.*)", lambda g: f"diffusion_model_time_embed_{int(g[0]) * 2 - 2}{g[1]}"),
    (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
     lambda g: f"diffusion_model_input_blocks_{1 + int(g[0]) * 3 + int(g[2])}_{1 if g[1] == 'attentions' else 0}_"
               f"{_suffix(g[1], g[3])}"),
    (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
     lambda g: f"diffusion_model_middle_block_{1 if g[0] == 'attentions' else int(g[1]) * 2}_{_suffix(g[0], g[2])}"),
    (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
     lambda g: f"diffusion_model_output_blocks_{int(g[0]) * 3 + int(g[2])}_{1 if g[1] == 'attentions' else 0}_"
               f"{_suffix(g[1], g[3])}"),
    (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv",
     lambda g: f"diffusion_model_input_blocks_{3 + int(g[0]) * 3}_0_op"),
    (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
     lambda g: f"diffusion_model_output_blocks_{2 + int(g[0]) * 3}_{2 if int(g[0]) > 0 else 1}_conv"),
]
_SD2_TEXT = (r"lora_te_text_model_encoder_layers_(\d+)_(.+)", lambda g: f"model_transformer_resblocks_{g[0]}_{_oc(g[1])}")
_TEXT_RULES = [
    (r"lora_te_text_model_encoder_layers_(\d+)_(.+)", lambda g: f"transformer_text_model_encoder_layers_{g[0]}_{g[1]}"),
    (r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", lambda g: f"1_model_transformer_resblocks_{g[0]}_{_oc(g[1])}"),
]


def _oc(rest: str) -> str:
    for hf, oc in OPEN_CLIP_PARTS:
        rest = rest.replace(hf, oc)
    return rest


def _suffix(kind: str, rest: str) -> str:
    return RESNET_SUFFIX.get(rest, rest) if kind == "resnets" else rest


def to_compvis(name: str, is_sd2: bool = False) -> str:
    """A kohya module name (`lora_unet_…`, `lora_te_…`) in A1111's module naming; unchanged if no rule applies."""
    for pattern, build in _UNET_RULES + ([_SD2_TEXT] if is_sd2 else []) + _TEXT_RULES:
        m = re.fullmatch(pattern, name)
        if m:
            return build(m.groups())
    return name


def _fallbacks(name: str, key: str) -> List[str]:
    m = _X_PROJ.match(key)
    out = [m.group(1)] if m else []
    if "lora_unet" in name:
        out.append(name.replace("lora_unet", "diffusion_model"))
    if "lora_te1_text_model" in name:
        out += [name.replace("lora_te1_text_model", "0_transformer_text_model"),
                name.replace("lora_te1_text_model", "transformer_text_model")]
    return out


def module_names_from_state_dict(keys: Iterable[str]) -> Set[str]:
    """A1111's module names from a single-file checkpoint's keys (what `named_modules` gives it in the WebUI)."""
    names = set()
    for key in keys:
        module = key.rsplit(".", 1)[0].replace(".wrapped.", ".")
        for prefix, repl in (("model.", ""), ("cond_stage_model.", ""), ("conditioner.embedders.", "")):
            if module.startswith(prefix):
                module = repl + module[len(prefix):]
                break
        names.add(module.replace(".", "_"))
    return names


def unmatched_keys(lora_keys: Iterable[str], known: Set[str],
                   convert: Optional[Callable[[str], str]] = None) -> List[str]:
    """The file's module keys A1111 would drop (empty when the LoRA fully applies).

    `convert(name)` defaults to `to_compvis` with SD2 detected as A1111 does (open_clip module names).
    """
    if convert is None:
        is_sd2 = any("model_transformer_resblocks" in k and not k.startswith("1_") for k in known)
        convert = lambda name: to_compvis(name, is_sd2)  # noqa: E731
    missing = []
    for name in sorted({k.split(".", 1)[0] for k in lora_keys}):
        key = convert(name)
        if key in known or any(f in known for f in _fallbacks(name, key)):
            continue
        missing.append(name)
    return missing
