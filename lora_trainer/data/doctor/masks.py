"""masked_loss: each readable image's mask found, opened and measured against the image (data/masks.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..masks import MaskError, find_mask, read_mask
from .pixels import Look
from .report import Finding

if TYPE_CHECKING:
    from ...config import TrainConfig


def mask_findings(looks: list[Look], cfg: TrainConfig) -> list[Finding]:
    findings = []
    for seen in looks:
        path = find_mask(seen.path, cfg.mask_dir)
        if path is None:
            findings.append(Finding(seen.name, "no_mask", "warning", f"No {seen.path.stem}_mask.png beside it"
                                    + (f", none in {cfg.mask_dir}" if cfg.mask_dir else "") + " and no alpha channel.",
                                    f"Add {seen.path.stem}_mask.png (white where to train), or train it whole."))
            continue
        try:
            mask = read_mask(path, seen.path)
        except MaskError as e:
            findings.append(Finding(seen.name, "mask_unreadable", "error", str(e),
                                    f"Save the mask again as a greyscale PNG of {seen.size}."))
            continue
        if mask.size != (seen.width, seen.height):
            findings.append(Finding(seen.name, "mask_size", "warning",
                                    f"The mask {path.name} is {mask.width}x{mask.height}, the image {seen.size}.",
                                    f"Save the mask at {seen.size}, drawn on the image as it is."))
    return findings
