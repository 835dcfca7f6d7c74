"""Strength grids: the same prompt and seed at several LoRA strengths, labelled, in one PNG.

During training the grid is rendered from the very modules being trained (a diffusers pipeline
object only wraps them: nothing is loaded twice). Strength 0 is the base model, so the grid
shows what the LoRA changes.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, List, Optional, Sequence

import torch

from .files import atomic_write_with
from .lora import set_lora_scale


def pipeline_for(components: Any) -> Any:
    """A diffusers text-to-image pipeline around `components` (no weights are copied)."""
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler.from_config(components.noise_scheduler.config)
    if components.family == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        te1, te2 = components.text_encoders
        tok1, tok2 = components.tokenizers
        return StableDiffusionXLPipeline(vae=components.vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                                         tokenizer_2=tok2, unet=components.unet, scheduler=scheduler)
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=components.vae, text_encoder=components.text_encoders[0],
                                   tokenizer=components.tokenizers[0], unet=components.unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@torch.no_grad()
def render_images(components: Any, prompts: Sequence[str], strengths: Sequence[float], seed: int = 1,
                  steps: int = 20, device: Any = None, size: Optional[int] = None, negative_prompt: str = "",
                  guidance_scale: float = 7.0) -> List[List[Any]]:
    """images[prompt][strength], each from the same seed. Leaves every module where it found it."""
    device = torch.device(device) if device is not None else next(components.unet.parameters()).device
    modules = [components.unet, components.vae, *components.text_encoders]
    places = [(m, next(m.parameters()).device, m.training) for m in modules]
    pipe = pipeline_for(components)
    pipe.set_progress_bar_config(disable=True)
    size = size or components.unet.config.sample_size * pipe.vae_scale_factor
    dtype = next(components.unet.parameters()).dtype
    for m in modules:
        m.to(device).eval()
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
                    generator = torch.Generator("cpu").manual_seed(seed)
                    out = pipe(prompt, negative_prompt=negative_prompt or None, num_inference_steps=steps,
                               guidance_scale=guidance_scale, height=size, width=size, generator=generator,
                               output_type="pil")
                    row.append(out.images[0])
                rows.append(row)
    finally:
        set_lora_scale(modules, 1.0)
        for m, where, training in places:
            m.to(where).train(training)
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


def label_grid(rows: List[List[Any]], column_labels: List[str], row_labels: List[str], seed: int) -> Any:
    """Paste images into a grid with a header row of column labels and a label under each row."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    w, h = rows[0][0].size
    header, footer = 18, 16
    grid = Image.new("RGB", (w * len(column_labels), header + (h + footer) * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(column_labels):
        draw.text((c * w + 4, 3), label, fill="black", font=font)
    for r, row in enumerate(rows):
        top = header + r * (h + footer)
        for c, image in enumerate(row):
            grid.paste(image.convert("RGB"), (c * w, top))
        text = f"{row_labels[r]}  (seed {seed})"
        draw.text((4, top + h + 2), text[: max(8, grid.width // 6)], fill="black", font=font)
    return grid
