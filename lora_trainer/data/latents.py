"""Cached VAE latents and text embeddings: encode once, train many epochs.

A latent is keyed by what changes it: the image bytes, the bucket size, the crop, the flip and
the VAE. Text embeddings are cached when the text encoders are frozen and captions do not change
between epochs (no shuffling), keyed by the caption, the text encoders and the precision. Both
live under `cache_dir` (default `output_dir/cache/`; the image folder is never written to), so
runs that share the folder (a sweep's) encode each image and caption once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from ..files import atomic_write_with


def vae_fingerprint(*models: torch.nn.Module) -> str:
    """A short id of the models' weights (a VAE; the text encoders): other weights never reuse these entries."""
    h = hashlib.sha1()
    for model in models:
        for name, p in sorted(model.state_dict().items())[:8]:
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
    """caption → (hidden states, pooled) while the text encoders are frozen; on disk too when given a folder."""

    def __init__(self, encode: Callable[[list], Tuple[torch.Tensor, Optional[torch.Tensor]]],
                 folder: Optional[Path] = None, encoder_id: str = "", device: Any = None) -> None:
        self.encode = encode
        self.folder = Path(folder) if folder else None
        self.encoder_id = encoder_id  # the text encoders' weights and the precision they ran in
        self.device = device
        self.memory: Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]] = {}

    def _file(self, caption: str) -> Optional[Path]:
        if self.folder is None:
            return None
        return self.folder / f"{hashlib.sha1(f'{caption}|{self.encoder_id}'.encode()).hexdigest()}.safetensors"

    def _from_disk(self, caption: str) -> bool:
        path = self._file(caption)
        if path is None or not path.is_file():
            return False
        from safetensors.torch import load_file

        saved = load_file(str(path), device=str(self.device or "cpu"))
        self.memory[caption] = (saved["hidden"], saved.get("pooled"))
        return True

    def __call__(self, captions: list) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        missing = [c for c in dict.fromkeys(captions) if c not in self.memory and not self._from_disk(c)]
        if missing:
            with torch.no_grad():
                hidden, pooled = self.encode(missing)
            for i, c in enumerate(missing):
                self.memory[c] = (hidden[i].detach(), None if pooled is None else pooled[i].detach())
                path = self._file(c)
                if path is not None:
                    from safetensors.torch import save_file

                    pair = {"hidden": hidden[i]} if pooled is None else {"hidden": hidden[i], "pooled": pooled[i]}
                    pair = {k: v.detach().to("cpu").contiguous() for k, v in pair.items()}
                    atomic_write_with(path, lambda tmp, pair=pair: save_file(pair, str(tmp)))
        hidden = torch.stack([self.memory[c][0] for c in captions])
        pooled_list = [self.memory[c][1] for c in captions]
        pooled = None if pooled_list[0] is None else torch.stack(pooled_list)
        return hidden, pooled
