"""The diffusion objective, the one definition the training loop and validation share.

Noise (with `noise_offset`) and a timestep per image, the noisy input, the model call with its
conditioning (text embeddings, SDXL's added conditioning), the target the prediction type asks for
(the noise, or the velocity for v-prediction), and the per-image loss (MSE, min-SNR-γ weighted).
A model family with another objective (Flux's rectified flow) adds its own here, not in the loop.
"""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F


def autocast(run: Any):
    """The run's mixed precision for the forward passes (none: fp32 or a half-precision base)."""
    if run.autocast_dtype is None:
        return nullcontext()
    return torch.autocast(run.device.type, dtype=run.autocast_dtype)


def set_train_mode(run: Any, training: bool) -> None:
    # train() only where LoRA dropout lives; the frozen base stays in eval (no base dropout).
    comps = run.components
    comps.unet.train(training)
    for te in comps.text_encoders:
        te.train(training and run.trains_text_encoder)


def gaussian_noise(cfg: Any, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise of `shape` (…, C, h, w) on the CPU, plus `noise_offset` × one value per channel."""
    drawn = torch.randn(shape, generator=generator)
    if cfg.noise_offset:
        drawn += cfg.noise_offset * torch.randn((*shape[:-2], 1, 1), generator=generator)
    return drawn


def draw(run: Any, shape: torch.Size, place: str) -> Tuple[torch.Tensor, int]:
    """One training image's noise and timestep, from a generator seeded by its place in the run alone."""
    seed = int.from_bytes(hashlib.sha256(f"{place}:noise".encode()).digest()[:8], "little") >> 1
    generator = torch.Generator("cpu").manual_seed(seed)
    drawn = gaussian_noise(run.cfg, shape, generator)
    if run.components.family == "flux":
        return drawn, flow_time(run.cfg, generator, image_tokens=(shape[-2] // 2) * (shape[-1] // 2))
    steps = run.components.noise_scheduler.config.num_train_timesteps
    return drawn, int(torch.randint(0, steps, (1,), generator=generator))


# flux_shift: the shift grows with the image's packed tokens, as FluxPipeline's dynamic shifting does (mu linear
# in the sequence length, from 0.5 at 256 tokens to 1.15 at 4096; shift = e^mu)
FLUX_SHIFT_TOKENS, FLUX_SHIFT_MU = (256, 4096), (0.5, 1.15)


def flow_time(cfg: Any, generator: torch.Generator, image_tokens: int = 4096) -> float:
    """Rectified flow's t in (0, 1) (1: pure noise), drawn as timestep_sampling says."""
    import math

    if cfg.timestep_sampling == "uniform":
        return float(torch.rand((), generator=generator))
    t = float(torch.sigmoid(torch.randn((), generator=generator)))
    shift = 1.0
    if cfg.timestep_sampling == "shift":
        shift = cfg.discrete_flow_shift
    elif cfg.timestep_sampling == "flux_shift":
        (lo, hi), (mu_lo, mu_hi) = FLUX_SHIFT_TOKENS, FLUX_SHIFT_MU
        shift = math.exp(mu_lo + (mu_hi - mu_lo) * (image_tokens - lo) / (hi - lo))
    return shift * t / (1 + (shift - 1) * t)


def text_conditioning(run: Any, captions: List[str]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(hidden states, pooled) of the captions: from the text cache, or the text encoders."""
    from ..model import encode_text

    if run.text_cache is not None:
        hidden, pooled = run.text_cache(captions)
    else:
        hidden, pooled = encode_text(run.components, captions)
    return hidden.to(run.device), None if pooled is None else pooled.to(run.device)


def added_conditioning(run: Any, pooled, sizes, crops, targets):
    """SDXL's added conditioning (pooled text, original size, crop, target size); None for SD1/SD2."""
    from ..model import unet_added_cond

    return unet_added_cond(run.components, pooled, sizes, crops, targets)


def image_losses(run: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, hidden: torch.Tensor,
                 added: Any, masks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-image loss of the UNet's prediction: what training minimises and validation measures. `masks`
    (B × 1 × h × w, masked_loss) weigh each latent position's error, as kohya's scripts do."""
    comps, cfg = run.components, run.cfg
    if comps.family == "flux":
        return flow_losses(run, latents, noise, timesteps, hidden, added, masks)
    sched = comps.noise_scheduler
    with autocast(run):
        noisy = sched.add_noise(latents, noise, timesteps)
        target = noise if comps.prediction_type == "epsilon" else sched.get_velocity(latents, noise, timesteps)
        pred = comps.unet(noisy, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
    loss = masked_mean(F.mse_loss(pred.float(), target.float(), reduction="none"), masks)
    if cfg.min_snr_gamma:
        loss = loss * min_snr_weights(sched, timesteps, cfg.min_snr_gamma, comps.prediction_type)
    return loss


def flow_losses(run: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, hidden: torch.Tensor,
                added: Any, masks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Flux's rectified flow: noisy = (1 - t)·x0 + t·ε, the transformer predicts ε - x0 on 2×2-packed latents.

    `timesteps`: t in (0, 1), or integer timesteps of [0, num_train_timesteps) (validation's fixed ones)."""
    from ..model.flux import latent_ids, pack_latents, unpack_latents

    transformer = run.components.unet
    t = timesteps.float()
    if not timesteps.is_floating_point():
        t = t / run.components.noise_scheduler.config.num_train_timesteps
    t = t.to(latents.device)
    b, c, h, w = latents.shape
    noisy = (1 - t.view(-1, 1, 1, 1)) * latents + t.view(-1, 1, 1, 1) * noise
    guidance = None
    if transformer.config.guidance_embeds:
        guidance = torch.full((b,), float(run.cfg.guidance_scale), device=latents.device)
    with autocast(run):
        pred = transformer(hidden_states=pack_latents(noisy), timestep=t, guidance=guidance,
                           pooled_projections=added["pooled_projections"], encoder_hidden_states=hidden,
                           txt_ids=torch.zeros(hidden.shape[1], 3, device=latents.device),
                           img_ids=latent_ids(h, w, latents.device), return_dict=False)[0]
    target = noise - latents
    return masked_mean(F.mse_loss(unpack_latents(pred.float(), c, h, w), target.float(), reduction="none"), masks)


def masked_mean(errors: torch.Tensor, masks: Optional[torch.Tensor]) -> torch.Tensor:
    """Each image's mean error (B × C × h × w → B), each position weighed by its mask when there are masks."""
    return (errors if masks is None else errors * masks).mean(dim=(1, 2, 3))


def min_snr_weights(sched: Any, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ weighting (Hang et al. 2023): down-weight the easy, low-noise timesteps."""
    alphas = sched.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=gamma) / snr
    return weight if prediction_type == "epsilon" else torch.clamp(snr, max=gamma) / (snr + 1)
