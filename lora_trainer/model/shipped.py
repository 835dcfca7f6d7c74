"""The configs that ship with the package: one folder per family and architecture variant.

`configs/<family>/<variant>/<part>.json` holds the diffusers / transformers config of each part
(`unet`, `vae`, `text_encoder`, `text_encoder_2`, `scheduler`). Variant `base` is the released
architecture (SD1.5, SD2.1 512/768, SDXL base 1.0); `tiny` is the same architecture shrunk for
tests, demos and benchmarks. Nothing is ever downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

FAMILIES = ("sd1", "sd2", "sdxl")
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "flux": "Flux.1"}


def a_family(family: str) -> str:
    """"an SD 1.x", "a Flux.1": a family's name with its article, for messages."""
    name = FAMILY_NAMES.get(family, family)
    return f"{'an' if name.startswith('S') else 'a'} {name}"
SUPPORTED = "SD 1.x, SD 2.x (512 and 768-v) and SDXL base"

# What each text encoder pads with, as the upstream tokenizers do: OpenAI's CLIP-L pads with
# <|endoftext|>, the OpenCLIP encoders (SD2, SDXL's second) with "!" (id 0).
PAD_TOKENS = {"sd1": ["<|endoftext|>"], "sd2": ["!"], "sdxl": ["<|endoftext|>", "!"]}


def text_encoder_parts(family: str) -> list[str]:
    return ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]


def variants(family: str) -> list[str]:
    """Architecture variants shipped for `family`, `base` first."""
    names = sorted(p.name for p in (CONFIG_DIR / family).iterdir() if p.is_dir())
    return sorted(names, key=lambda n: n != "base")


def load_config(family: str, part: str, variant: str = "base") -> dict:
    """A fresh copy of a shipped config (callers may change it)."""
    path = CONFIG_DIR / family / variant / f"{part}.json"
    return json.loads(path.read_text(encoding="utf-8"))


def load_configs(family: str, variant: str = "base") -> dict[str, dict]:
    parts = ["unet", "vae", *text_encoder_parts(family), "scheduler"]
    return {part: load_config(family, part, variant) for part in parts}
