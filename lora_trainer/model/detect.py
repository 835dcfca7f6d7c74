"""Which family a checkpoint in the original single-file (LDM / CompVis / SGM) layout belongs to."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

from ..errors import ModelError
from .shipped import SUPPORTED

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# Where each family keeps its text encoders, in encoder order, and in which layout.
TEXT_ENCODERS = {
    "sd1": [("cond_stage_model.transformer.", "clip_l")],
    "sd2": [("cond_stage_model.model.", "open_clip")],
    "sdxl": [("conditioner.embedders.0.transformer.", "clip_l"), ("conditioner.embedders.1.model.", "open_clip")],
}

T = TypeVar("T")


def normalize_keys(sd: Mapping[str, T]) -> Mapping[str, T]:
    """Undo the wrappers A1111 puts around its text encoders (`cond_stage_model.wrapped.…`).

    Without wrappers `sd` itself comes back (a handed-over dict must be consumed, not a copy of it); a
    `CheckpointFile` is renamed in place (nothing is read); a wrapped dict gets a new dict of the same tensors.
    """
    def fix(key: str) -> str:
        return key.replace(".wrapped.", ".", 1) if key.startswith(("cond_stage_model.", "conditioner.")) else key

    wrapped = any(".wrapped." in k for k in sd)
    if not wrapped:
        return sd
    if hasattr(sd, "rename"):
        return sd.rename(fix)
    return {fix(k): v for k, v in sd.items()}


def detect_family(keys: Iterable[str]) -> str:
    """"sd1", "sd2" or "sdxl" from the keys of an original-layout checkpoint; ModelError otherwise."""
    keys = [k.replace(".wrapped.", ".", 1) for k in keys]

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("conditioner.embedders.1.model."):
        return "sdxl"
    if has("conditioner.embedders.0.model.") and not has("conditioner.embedders.1."):
        raise ModelError(
            f"This is an SDXL refiner checkpoint: LoRAs are trained on a base model. Supported: {SUPPORTED}."
        )
    if has("cond_stage_model.model.transformer.resblocks.") or has("cond_stage_model.model.token_embedding"):
        return "sd2"
    if has("cond_stage_model.transformer."):
        return "sd1"
    if has(UNET_PREFIX + "label_emb.0.0.") and not has("cond_stage_model."):
        return "sdxl"
    sample = ", ".join(keys[:3]) if keys else "no keys at all"
    if has("double_blocks.") or has("model.diffusion_model.double_blocks."):
        raise ModelError("This is a Flux.1 transformer: Flux trains from its file (base_model, with clip_l, t5xxl and "
                         f"vae set); merging into a checkpoint and a host's model in memory take {SUPPORTED} only.")
    if any(".lora_down." in k or ".lora_A." in k or k.startswith(("lora_unet_", "lora_te")) for k in keys):
        raise ModelError(
            f"This file is a LoRA (keys start with {sample}), not a base model: give the full checkpoint the LoRA "
            f"is used with ({SUPPORTED}). A LoRA goes where LoRAs are asked for (--lora, init_lora)."
        )
    if has(UNET_PREFIX):
        raise ModelError(
            "The checkpoint has a UNet but no text encoder, so its family cannot be told (keys start with "
            f"{sample}). Give a full checkpoint, or set model_family to sd1 / sd2 / sdxl. Supported: {SUPPORTED}."
        )
    raise ModelError(
        f"Unknown checkpoint layout (keys start with {sample}). Supported: {SUPPORTED}, as a single-file "
        ".safetensors in the original layout or a diffusers folder. LoRA, VAE-only, SD3, Flux and other "
        "models cannot be trained on."
    )
