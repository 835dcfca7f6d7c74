"""How each family conditions its UNet: text embeddings and (SDXL) size/crop ids.

Exactly as the diffusers pipelines do it, so a LoRA trained here sees at training time what it
sees at inference: SD1/SD2 use the encoder's last_hidden_state (SD2's diffusers encoder already
stops at OpenCLIP's penultimate layer); SDXL concatenates both encoders' penultimate hidden states
and adds the second encoder's projected pooled output plus the size/crop ids.
Prompts longer than 77 tokens are truncated, as the diffusers pipelines do. Flux (FluxPipeline's way):
T5's last hidden state (512 tokens for dev, 256 for schnell) and CLIP-L's pooled output.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    import torch

    from .components import Components

Size = Union[Sequence[int], "torch.Tensor"]


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids [batch, 77], padded and truncated the way the pipelines do."""
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def encode_text(components: Components, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(encoder_hidden_states, pooled or None) for `captions`, on the text encoders' device and dtype.

    Gradients flow when the caller has them enabled (text-encoder LoRA training); wrap the call in
    torch.no_grad() to cache embeddings.
    """
    import torch

    if isinstance(captions, str):
        captions = [captions]
    if components.family == "flux":
        from .flux import T5_MAX_LENGTH

        (clip, t5), (clip_tokenizer, t5_tokenizer) = components.text_encoders, components.tokenizers
        pooled = clip(tokenize(clip_tokenizer, captions).to(clip.device)).pooler_output
        ids = t5_tokenizer(list(captions), padding="max_length", max_length=T5_MAX_LENGTH[components.variant],
                           truncation=True, return_tensors="pt").input_ids
        return t5(ids.to(t5.device))[0], pooled
    if components.family != "sdxl":
        encoder = components.text_encoders[0]
        ids = tokenize(components.tokenizers[0], captions).to(encoder.device)
        return encoder(ids)[0], None
    hidden, pooled = [], None
    for encoder, tokenizer in zip(components.text_encoders, components.tokenizers):
        ids = tokenize(tokenizer, captions).to(encoder.device)
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # the last encoder (CLIPTextModelWithProjection): text_embeds
    return torch.cat(hidden, dim=-1), pooled


def unet_added_cond(components: Components, pooled: torch.Tensor | None, original_sizes: Size,
                    crops_top_left: Size, target_sizes: Size) -> dict | None:
    """SDXL's `added_cond_kwargs` ({"text_embeds", "time_ids"}); Flux's pooled CLIP-L; None for SD1/SD2.

    Sizes are (height, width) and crops (top, left) in pixels: one pair for the whole batch, a
    list of pairs, or a [batch, 2] tensor.
    """
    if components.family == "flux":
        return {"pooled_projections": pooled}
    if components.family != "sdxl":
        return None
    import torch

    if pooled is None:
        raise ValueError("SDXL needs the pooled text embedding from encode_text().")
    batch = pooled.shape[0]
    parts = [_pairs(v, batch) for v in (original_sizes, crops_top_left, target_sizes)]
    time_ids = torch.cat(parts, dim=1).to(device=pooled.device, dtype=pooled.dtype)
    return {"text_embeds": pooled, "time_ids": time_ids}


def _pairs(value: Size, batch: int) -> torch.Tensor:
    import torch

    if isinstance(value, torch.Tensor):
        t = value.detach().to(device="cpu", dtype=torch.float32)
    else:
        items = list(value)
        if len(items) == 2 and all(isinstance(v, numbers.Number) for v in items):
            items = [items]  # one (h, w) for the whole batch
        t = torch.tensor([[float(a), float(b)] for a, b in items])
    t = t.reshape(1, -1) if t.dim() == 1 else t
    if t.dim() != 2 or t.shape[1] != 2 or t.shape[0] not in (1, batch):
        raise ValueError(f"expected (h, w) pairs for {batch} images, got shape {tuple(t.shape)}")
    return t.expand(batch, 2)
