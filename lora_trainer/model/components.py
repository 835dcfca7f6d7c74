"""What the model stage hands to the rest of the trainer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass
class Components:
    """The parts of a Stable Diffusion model the trainer uses, all in diffusers / transformers classes.

    family: "sd1" | "sd2" | "sdxl".
    text_encoders / tokenizers: one CLIPTextModel for sd1/sd2; [CLIPTextModel,
    CLIPTextModelWithProjection] for sdxl, with a CLIPTokenizer each.
    noise_scheduler: the DDPMScheduler to train with; its prediction_type equals `prediction_type`.
    model_hash: sha256 of the file for a file, a fingerprint of the weights otherwise; while a file is still
    being hashed (in a background thread, beside loading and training), a Future of it: read `resolved_hash()`.
    source: the path given, or "<in-memory>".
    """

    family: str
    unet: Any
    vae: Any
    text_encoders: list
    tokenizers: list
    noise_scheduler: Any
    prediction_type: str
    name: str
    model_hash: Any
    source: str
    variant: str = "base"  # which shipped architecture ("tiny" for test models); "diffusers" for folders

    @property
    def is_sdxl(self) -> bool:
        return self.family == "sdxl"

    def resolved_hash(self) -> str:
        """The model hash, waiting for the background hash of the file if it is still running."""
        result = getattr(self.model_hash, "result", None)
        return result() if callable(result) else self.model_hash

    def models(self) -> list:
        """UNet, VAE and text encoders, in that order."""
        return [self.unet, self.vae, *self.text_encoders]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Components:
        """Move (and optionally cast) every model in place; returns self for chaining."""
        import torch

        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for model in self.models():
            if kwargs:  # torch's own .to(): diffusers' override warns on every dtype change
                torch.nn.Module.to(model, **kwargs)
        return self

    def requires_grad_(self, flag: bool = False) -> Components:
        """Freeze (default) or unfreeze every base weight; LoRA layers are added afterwards."""
        for model in self.models():
            model.requires_grad_(flag)
        return self
