"""Cached VAE latents and text embeddings: encode once, train many epochs.

A latent is keyed by what changes it: the image bytes, the bucket size, the crop, the flip and
the VAE. Cache files live under `output_dir/cache/` (the image folder is never written to).
Text embeddings are cached in memory when the text encoders are frozen and captions do not
change between epochs (no shuffling).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch

from ..files import atomic_write_with


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """A short id of the VAE's weights: a new VAE never reuses another's latents."""
    h = hashlib.sha1()
    for name, p in sorted(vae.state_dict().items())[:8]:
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(p.detach().float().flatten()[:64].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class LatentCache:
    """Memory + disk cache of scaled latents (`vae.encode(x).latent_dist.mean * scaling_factor`).

    The mean is cached rather than a sample, so a cached run and an uncached run with the same
    crop and flip see the same latents.
    """

    def __init__(self, folder: Optional[Path], vae_id: str) -> None:
        self.folder = Path(folder) if folder else None
        self.vae_id = vae_id
        self.memory: Dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def key(self, content_hash: str, bucket: Tuple[int, int], crop: Tuple[int, int], flip: bool) -> str:
        raw = f"{content_hash}|{bucket}|{crop}|{int(flip)}|{self.vae_id}"
        return hashlib.sha1(raw.encode()).hexdigest()

    def get(self, key: str, encode: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key in self.memory:
            self.hits += 1
            return self.memory[key]
        path = self.folder / f"{key}.safetensors" if self.folder else None
        if path is not None and path.is_file():
            from safetensors.torch import load_file

            latent = load_file(str(path))["latent"]
            self.hits += 1
        else:
            latent = encode().detach().to("cpu", torch.float32).contiguous()
            self.misses += 1
            if path is not None:
                from safetensors.torch import save_file

                atomic_write_with(path, lambda tmp: save_file({"latent": latent}, str(tmp)))
        self.memory[key] = latent
        return latent


@torch.no_grad()
def encode_pixels(vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] (B×3×H×W) → scaled latents, in the VAE's dtype and device."""
    param = next(vae.parameters())
    dist = vae.encode(pixels.to(param.device, param.dtype)).latent_dist
    latents = dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


class TextEmbeddingCache:
    """caption → (hidden states, pooled) while the text encoders are frozen."""

    def __init__(self, encode: Callable[[list], Tuple[torch.Tensor, Optional[torch.Tensor]]]) -> None:
        self.encode = encode
        self.memory: Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]] = {}

    def __call__(self, captions: list) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        missing = [c for c in dict.fromkeys(captions) if c not in self.memory]
        if missing:
            with torch.no_grad():
                hidden, pooled = self.encode(missing)
            for i, c in enumerate(missing):
                self.memory[c] = (hidden[i].detach(), None if pooled is None else pooled[i].detach())
        hidden = torch.stack([self.memory[c][0] for c in captions])
        pooled_list = [self.memory[c][1] for c in captions]
        pooled = None if pooled_list[0] is None else torch.stack(pooled_list)
        return hidden, pooled
