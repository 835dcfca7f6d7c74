"""Pictures the nodes output: the loss curve and the labelled strength grid, as ComfyUI IMAGE tensors.

A ComfyUI IMAGE is a float tensor [batch, height, width, 3] in 0..1.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..lora_trainer.evaluate.loss_plot import loss_image

BG, FG = (255, 255, 255), (20, 20, 20)


def pil_to_image(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]


def image_to_pil(image: torch.Tensor) -> Image.Image:
    array = (image[0] if image.dim() == 4 else image).detach().float().cpu().clamp(0, 1).numpy()
    return Image.fromarray((array * 255).round().astype(np.uint8))


def loss_curve(losses: Sequence[float], width: int = 512, height: int = 256, val: Any = None,
               first_step: int = 1) -> torch.Tensor:
    """Loss per step, its smoothed line and the validation losses ((step, value) pairs): the tab's drawing
    (lora_trainer.evaluate.loss_plot) as an IMAGE."""
    return pil_to_image(loss_image(losses, width, height, val=val, first_step=first_step))


def labelled_grid(images: Sequence[Image.Image], labels: Sequence[str], band: int = 24) -> torch.Tensor:
    """One row of images, each with its label in a band above it."""
    w = max(i.width for i in images)
    h = max(i.height for i in images)
    grid = Image.new("RGB", (w * len(images), h + band), BG)
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    for n, (image, label) in enumerate(zip(images, labels)):
        grid.paste(image.convert("RGB"), (n * w, band))
        draw.text((n * w + 6, 6), label, fill=FG, font=font)
    return pil_to_image(grid)
