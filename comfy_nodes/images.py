"""Pictures the nodes output: the loss curve and the labelled strength grid, as ComfyUI IMAGE tensors.

A ComfyUI IMAGE is a float tensor [batch, height, width, 3] in 0..1.
"""

from __future__ import annotations

from typing import List, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

BG, FG, GRID, LINE = (255, 255, 255), (20, 20, 20), (225, 225, 225), (40, 110, 220)


def pil_to_image(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]


def image_to_pil(image: torch.Tensor) -> Image.Image:
    array = (image[0] if image.dim() == 4 else image).detach().float().cpu().clamp(0, 1).numpy()
    return Image.fromarray((array * 255).round().astype(np.uint8))


def loss_curve(losses: Sequence[float], width: int = 512, height: int = 256) -> torch.Tensor:
    """Loss per step (light) and its moving average (dark), with the min and max written on the axis."""
    img = Image.new("RGB", (width, height), BG)
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    left, top, right, bottom = 48, 20, width - 10, height - 24
    draw.rectangle([left, top, right, bottom], outline=GRID)
    values = [v for v in losses if np.isfinite(v)]
    draw.text((left, 4), f"loss, {len(losses)} steps", fill=FG, font=font)
    if len(values) >= 1:
        lo, hi = min(values), max(values)
        span = (hi - lo) or 1.0
        draw.text((2, top), f"{hi:.3g}", fill=FG, font=font)
        draw.text((2, bottom - 10), f"{lo:.3g}", fill=FG, font=font)

        def points(series: Sequence[float]) -> List[tuple]:
            n = max(len(series) - 1, 1)
            return [(left + (right - left) * i / n, bottom - (bottom - top) * (v - lo) / span)
                    for i, v in enumerate(series)]

        window = max(1, len(values) // 20)
        smooth = np.convolve(values, np.ones(window) / window, mode="valid").tolist()
        if len(values) > 1:
            draw.line(points(values), fill=(170, 195, 240), width=1)
        if len(smooth) > 1:
            draw.line(points(smooth), fill=LINE, width=2)
    else:
        draw.text((left + 10, (top + bottom) // 2), "no steps were trained", fill=FG, font=font)
    return pil_to_image(img)


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
