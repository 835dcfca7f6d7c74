"""Text encoders from the original single-file layout to transformers' CLIP models.

Two source layouts exist:

* OpenAI CLIP-L (SD1, SDXL's first encoder) was already a transformers `CLIPTextModel` in the
  original code: only the prefix differs.
* OpenCLIP (SD2's ViT-H, SDXL's bigG) has its own names, a fused qkv projection and a text
  projection stored as a matrix to right-multiply. SD2 conditions on the penultimate layer, so
  diffusers' SD2 encoder has 23 layers and the 24th is dropped here.

The result uses transformers 4.x names (`text_model.…`); `match_model_layout` then fits them to
the model at hand, because transformers 5 dropped that level for `CLIPTextModel` only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_OPEN_CLIP_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
# Inside one residual block: (OpenCLIP, transformers)
_OPEN_CLIP_BLOCK = (
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
    ("attn.out_proj.", "self_attn.out_proj."),
)
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_IN_PROJ = re.compile(r"attn\.in_proj_(weight|bias)")


def clip_l_from_ldm(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """`<prefix>text_model.…` → `text_model.…` (very old files lack the `text_model.` level)."""
    out = {}
    for key, value in sd.items():
        if key.startswith(prefix):
            name = key[len(prefix):]
            out[name if name.startswith("text_model.") else "text_model." + name] = value
    return out


def open_clip_from_ldm(sd: Mapping[str, torch.Tensor], prefix: str, num_layers: int,
                       with_projection: bool, consume: bool = False) -> dict[str, torch.Tensor]:
    """OpenCLIP text tower under `prefix` → transformers names; layers from `num_layers` on are dropped.

    consume=True (a dict that is ours): entries are taken out of `sd` and fused projections split into
    tensors of their own, so a fused tensor is freed as soon as it is split (SDXL's bigG: 0.6 GB in fp32).
    """
    out = {}
    for key in list(sd):
        if not key.startswith(prefix):
            continue
        value = sd.pop(key) if consume else sd[key]
        name = key[len(prefix):]
        if name in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[name]] = value
        elif name == "text_projection":
            if with_projection:  # x @ P in OpenCLIP is Linear with weight P.T
                out["text_projection.weight"] = value.t()
        elif match := _RESBLOCK.fullmatch(name):
            index, rest = int(match[1]), match[2]
            if index < num_layers:
                out.update(_open_clip_block(f"text_model.encoder.layers.{index}.", rest, value, consume))
        # anything else (logit_scale, attn_mask, a visual tower) is not part of the text encoder
    return out


def _open_clip_block(base: str, rest: str, value: torch.Tensor, own: bool = False) -> dict[str, torch.Tensor]:
    if fused := _IN_PROJ.fullmatch(rest):
        q, k, v = (t.clone() if own else t for t in value.chunk(3, dim=0))
        kind = fused[1]
        return {f"{base}self_attn.{p}_proj.{kind}": t for p, t in zip(("q", "k", "v"), (q, k, v))}
    for old, new in _OPEN_CLIP_BLOCK:
        if rest.startswith(old):
            return {base + new + rest[len(old):]: value}
    return {}


def match_model_layout(sd: Mapping[str, torch.Tensor], model_keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Fit `text_model.…` names to the model's own: decided from its keys, never from a version number."""
    if any(k.startswith("text_model.") for k in model_keys):
        return dict(sd)
    return {(k.removeprefix("text_model.")): v for k, v in sd.items()}
