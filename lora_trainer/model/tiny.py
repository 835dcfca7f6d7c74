"""Tiny random models with each family's real architecture, for tests, the demo and benchmarks.

Same block types, layer counts per block, attention layout and module names as the real model
(so LoRA targets and key names are the real ones), with a few dozen channels instead of
hundreds. The configs are the shipped `tiny` variant, so a single-file checkpoint of a tiny model
loads back through `load_components` like a real one.
"""

from __future__ import annotations

from .components import Components
from .factory import build_scheduler, build_text_encoder, build_unet, build_vae, cast
from .hashing import state_dict_fingerprint
from .shipped import FAMILIES, PAD_TOKENS, load_configs, text_encoder_parts
from .tokenizers import load_clip_tokenizer


def build_tiny_components(family: str = "sd1", seed: int = 0) -> Components:
    """A tiny random `family` model on the CPU in float32; the same `seed` gives the same weights.

    The global torch RNG is left as it was.
    """
    return build_random_components(family, "tiny", seed)


def build_random_components(family: str = "sd1", variant: str = "tiny", seed: int = 0) -> Components:
    """Random weights in a shipped architecture: `tiny` for tests, `base` (real size) for benchmarks."""
    import torch

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, not {family!r}")
    configs = load_configs(family, variant)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = build_unet(configs["unet"])
        vae = build_vae(configs["vae"])
        encoders = [build_text_encoder(configs[part]) for part in text_encoder_parts(family)]
    models = [cast(m, torch.float32).eval() for m in (unet, vae, *encoders)]
    return Components(
        family=family, unet=models[0], vae=models[1], text_encoders=models[2:],
        tokenizers=[load_clip_tokenizer(pad) for pad in PAD_TOKENS[family]],
        noise_scheduler=build_scheduler(configs["scheduler"], "epsilon"), prediction_type="epsilon",
        name=f"{variant}-{family}", model_hash=state_dict_fingerprint(m.state_dict() for m in models),
        source="<in-memory>", variant=variant,
    )
