"""The model stage: a Stable Diffusion base model → `Components` (UNet, VAE, text encoders, tokenizers, scheduler).

    from lora_trainer.model import load_components, encode_text, unet_added_cond
    parts = load_components("models/Stable-diffusion/v1-5-pruned.safetensors")

Sources: a single-file checkpoint in the original layout, a diffusers folder, or a host's state
dict in memory; families SD1.x, SD2.x, SDXL base. Configs and tokenizer files never come from the
network. Importing this package loads nothing: torch, diffusers and transformers are imported
when a function is called.
"""

from .components import Components
from .conditioning import encode_text, unet_added_cond
from .detect import detect_family
from .loader import load_components
from .tiny import build_tiny_components

__all__ = ["Components", "build_tiny_components", "detect_family", "encode_text", "load_components",
           "unet_added_cond"]
