"""Strength grids: the same prompt and seed at several LoRA strengths, labelled, in one PNG.

During training the grid is rendered from the very modules being trained: nothing is loaded
twice. The sampler is a plain Euler loop with classifier-free guidance over the model's own
components rather than a diffusers pipeline, because the pipelines do not import beside the
transformers that A1111 1.10 pins. Strength 0 is the base model, so the grid shows what the LoRA
changes.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import torch

from ..files import atomic_write_with
from ..adapters.lora import set_lora_scale
from ..model.precision import compute_dtype_of, is_offloaded


@torch.no_grad()
def parse_strengths(text: str, field: str = "strengths") -> List[float]:
    """LoRA strengths as a user types them ("0.5,0.6,0.7"; ';' works too): 1 to 16 numbers, else a ConfigError
    that names `field` (the CLI's --strengths, a node's input)."""
    from ..errors import ConfigError

    try:
        values = [float(part) for part in text.replace(";", ",").split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{field}: write numbers separated by commas, e.g. 0.5,0.6,0.7,0.8 (got {text!r}).") \
            from None
    if not values or len(values) > 16:
        raise ConfigError(f"{field}: give 1 to 16 values, e.g. 0.5,0.6,0.7,0.8 (got {text!r}).")
    return values


def generate(components: Any, prompt: str, negative_prompt: str = "", steps: int = 20, guidance_scale: float = 7.0,
             size: int = 512, seed: int = 1, device: Any = "cpu") -> Any:
    """One image as a PIL image: Euler sampling with classifier-free guidance (Flux: flow_sample)."""
    from diffusers import EulerDiscreteScheduler

    from ..model import encode_text, unet_added_cond

    device = torch.device(device)
    if components.family == "flux":
        return flow_sample(components, prompt, steps, size, seed, device)
    scheduler = EulerDiscreteScheduler.from_config(components.noise_scheduler.config)
    scheduler.set_timesteps(steps, device=device)
    hidden, pooled = encode_text(components, [negative_prompt, prompt])
    hidden = hidden.to(device)
    pooled = None if pooled is None else pooled.to(device)
    added = unet_added_cond(components, pooled, [(size, size)] * 2, [(0, 0)] * 2, [(size, size)] * 2)
    vae = components.vae
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    channels = components.unet.config.in_channels
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn((1, channels, size // factor, size // factor), generator=generator).to(device)
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        uncond, cond = components.unet(model_in, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample.chunk(2)
        latents = scheduler.step(uncond + guidance_scale * (cond - uncond), t, latents).prev_sample
    return decode(vae, latents)


FLUX_GUIDANCE = 3.5  # what Flux dev is sampled with (its guidance embedding; no classifier-free guidance)


def flow_sample(components: Any, prompt: str, steps: int, size: int, seed: int, device: torch.device) -> Any:
    """One Flux image: Euler steps along the learned flow from noise (t = 1) to the image (t = 0); dev's schedule
    shifted towards noise by 3, as FluxPipeline's is at about 1 megapixel."""
    from ..model import encode_text
    from ..model.flux import latent_ids, pack_latents, unpack_latents

    transformer, vae = components.unet, components.vae
    hidden, pooled = (t.to(device) for t in encode_text(components, [prompt]))
    channels, side = vae.config.latent_channels, size // 2 ** (len(vae.config.block_out_channels) - 1)
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn((1, channels, side, side), generator=generator).to(device)
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    if components.variant == "dev":
        sigmas = 3.0 * sigmas / (1 + 2.0 * sigmas)
    guidance = torch.full((1,), FLUX_GUIDANCE, device=device) if transformer.config.guidance_embeds else None
    ids, text_ids = latent_ids(side, side, device), torch.zeros(hidden.shape[1], 3, device=device)
    for now, later in zip(sigmas[:-1], sigmas[1:]):
        flow = transformer(hidden_states=pack_latents(latents), timestep=now.view(1).to(device), guidance=guidance,
                           pooled_projections=pooled, encoder_hidden_states=hidden, txt_ids=text_ids, img_ids=ids,
                           return_dict=False)[0]
        latents = latents + (later - now) * unpack_latents(flow.float(), channels, side, side)
    return decode(vae, latents)


def decode(vae: Any, latents: torch.Tensor) -> Any:
    """The VAE's picture of scaled (and shifted) latents, as a PIL image."""
    from PIL import Image

    shift = getattr(vae.config, "shift_factor", None) or 0.0
    param = next(vae.parameters())
    image = vae.decode((latents / vae.config.scaling_factor + shift).to(param.device, param.dtype)).sample
    array = ((image[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def render_images(components: Any, prompts: Sequence[str], strengths: Sequence[float], seed: int = 1,
                  steps: int = 20, device: Any = None, size: Optional[int] = None, negative_prompt: str = "",
                  guidance_scale: float = 7.0) -> List[List[Any]]:
    """images[prompt][strength], each from the same seed. Leaves every module where it found it."""
    device = torch.device(device) if device is not None else next(components.unet.parameters()).device
    modules = [components.unet, components.vae, *components.text_encoders]
    places = [(m, next(m.parameters()).device, m.training) for m in modules]
    factor = 2 ** (len(components.vae.config.block_out_channels) - 1)
    size = size or (1024 if components.family == "flux" else components.unet.config.sample_size * factor)
    dtype = compute_dtype_of(components.unet)
    for m in modules:
        if not is_offloaded(m):  # an offloaded UNet fetches its weights layer by layer already
            m.to(device)
        m.eval()
    # Half-precision base weights next to an fp32 VAE: autocast reconciles them.
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    rows = []
    try:
        with torch.random.fork_rng(devices=cuda_devices), autocast:  # sampling must not move the training RNG
            for prompt in prompts:
                row = []
                for strength in strengths:
                    set_lora_scale(modules, strength)
                    row.append(generate(components, prompt, negative_prompt, steps, guidance_scale, size, seed,
                                        device))
                rows.append(row)
    finally:
        set_lora_scale(modules, 1.0)
        for m, where, training in places:
            if not is_offloaded(m):
                m.to(where)
            m.train(training)
    return rows


def render_grid(components: Any, prompts: Sequence[str], strengths: Sequence[float], path: Optional[Path] = None,
                seed: int = 1, steps: int = 20, device: Any = None, size: Optional[int] = None,
                negative_prompt: str = "") -> Any:
    """Render and label a prompts × strengths grid; write it to `path` (atomic) if given."""
    rows = render_images(components, prompts, strengths, seed, steps, device, size, negative_prompt)
    grid = label_grid(rows, [f"strength {s:g}" for s in strengths], list(prompts), seed)
    if path is not None:
        atomic_write_with(Path(path), lambda tmp: grid.save(tmp, format="PNG"))
    return grid


def label_grid(rows: List[List[Any]], column_labels: List[str], row_labels: List[str], seed: int,
               column_notes: Optional[Sequence[str]] = None) -> Any:
    """Paste images into a grid with a header row of column labels and a label under each row; `column_notes`
    (e.g. each column's scores) go in a line under the whole grid, one under each column."""
    from PIL import Image, ImageDraw

    w, h = rows[0][0].size
    font, size = _label_font(max(10, w // 40))  # readable on 1024 px pictures as on 64 px ones
    header, footer = size + 8, size + 6
    notes = header if column_notes else 0
    grid = Image.new("RGB", (w * len(column_labels), header + (h + footer) * len(rows) + notes), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(column_labels):
        draw.text((c * w + 4, 3), _fit(draw, font, label, w - 8, drop_words=True), fill="black", font=font)
    for r, row in enumerate(rows):
        top = header + r * (h + footer)
        for c, image in enumerate(row):
            grid.paste(image.convert("RGB"), (c * w, top))
        text = _fit(draw, font, f"{row_labels[r]}  (seed {seed})", grid.width - 8, drop_words=False)
        draw.text((4, top + h + 2), text, fill="black", font=font)
    for c, note in enumerate(column_notes or []):
        draw.text((c * w + 4, grid.height - notes + 3), _fit_parts(draw, font, note, w - 8), fill="black", font=font)
    return grid


def _label_font(size: int) -> Tuple[Any, int]:
    """Pillow's built-in font at `size` px; Pillow < 10.1 (A1111 pins 9.5) only has a fixed ~11 px bitmap font."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size), size
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default(), 11


def _fit(draw: Any, font: Any, text: str, width: int, drop_words: bool) -> str:
    """`text` cut to `width` px; column labels lose leading words first ("strength 0.5" → "0.5")."""
    words = text.split(" ")
    while drop_words and len(words) > 1 and draw.textlength(" ".join(words), font=font) > width:
        words = words[1:]
    text = " ".join(words)
    while len(text) > 1 and draw.textlength(text, font=font) > width:
        text = text[:-1]
    return text


def _fit_parts(draw: Any, font: Any, text: str, width: int) -> str:
    """`text` cut to `width` px; its " · "-separated parts are dropped from the end first."""
    parts = text.split(" · ")
    while len(parts) > 1 and draw.textlength(" · ".join(parts), font=font) > width:
        parts = parts[:-1]
    return _fit(draw, font, " · ".join(parts), width, drop_words=False)
