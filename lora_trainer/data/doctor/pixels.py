"""Each image opened once: whether it decodes, its size against the buckets, and what it looks like.

`look` decodes a file with `images.load_image` (the function training uses, so the doctor sees
the pixels training would see: EXIF orientation applied, transparency on white, 8-bit RGB) and
keeps only what the checks need: the size, a digest of the pixels (exact duplicates) and a
signature (near duplicates, see likeness.py). Images are opened one after another: load_image
switches process-wide Pillow and warnings settings while it decodes, which threads would race
on, and one core already does 500 images of 1024 px in about 13 s (bench/doctor_speed.py).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from ..dataset import Bucket, ImageRecord, assign_bucket, plan_crop
from ..images import ImageLoadError, load_image, min_side
from .report import Finding

if TYPE_CHECKING:
    from ...config import TrainConfig

SIGNATURE_SIDE = 8  # the signature is an 8x8 colour thumbnail
FLAT_RMS = 2.0  # thumbnails flatter than this (grey levels, RMS) have no shape to compare
MAX_CROP = 0.15  # an image outside the bucket range is flagged when more than this share is cropped away


@dataclass
class Look:
    path: Path
    width: int = 0  # after EXIF orientation
    height: int = 0
    error: str = ""  # why it cannot be decoded (load_image's one-line reason)
    file_hash: str = ""  # sha1 of the file's bytes (ImageRecord.content_hash)
    pixel_hash: str = ""  # sha1 of the size and the decoded RGB pixels
    signature: Any = None  # numpy float32 vector, zero-mean per channel, unit length (zeros when flat)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"


def look(path: Path) -> Look:
    """Decode `path` once and keep its size, pixel digest and signature."""
    try:
        loaded = load_image(path)
    except ImageLoadError as e:
        return Look(path, error=str(e))
    img = loaded.image
    digest = hashlib.sha1(f"{img.width}x{img.height}:".encode())
    digest.update(img.tobytes())
    return Look(path, img.width, img.height, "", loaded.content_hash, digest.hexdigest(), signature(img))


def signature(img: Image.Image) -> Any:
    """The image averaged down to 8x8 RGB, each channel's mean removed, scaled to unit length.

    Resizing, recompressing and small crops barely move the 64 averages; removing the means and the
    scale makes brightness, contrast and colour-cast edits vanish. Colour stays in (unlike a grey
    dHash/pHash): the same layout in other colours is another image.
    """
    import numpy as np

    thumb = img.resize((SIGNATURE_SIDE, SIGNATURE_SIDE), Image.Resampling.BOX)
    values = np.asarray(thumb, dtype=np.float32).reshape(-1, 3)
    values = values - values.mean(axis=0)
    norm = float(np.linalg.norm(values))
    if norm < FLAT_RMS * math.sqrt(values.size):
        return np.zeros(values.size, dtype=np.float32)
    return (values / norm).ravel()


def record(seen: Look, caption: str) -> ImageRecord:
    """The ImageRecord training would build for a readable image (for buckets and step counts)."""
    return ImageRecord(seen.path, seen.name, caption, seen.width, seen.height, seen.file_hash)


def unreadable(seen: Look) -> Finding:
    fix = ("Resize it below the limit and save it again." if seen.error.startswith("too large")
           else "Replace it with a working copy (open and re-save it in an image editor), or delete it.")
    return Finding(seen.name, "unreadable", "error", f"{seen.error}; training skips it", fix)


def size_findings(seen: Look, bucket: Bucket, buckets: list[Bucket], cfg: TrainConfig) -> list[Finding]:
    """too_small and extreme_aspect for one readable image in its bucket (buckets: make_buckets(cfg))."""
    shapes = buckets if cfg.enable_bucket else [(cfg.resolution, cfg.resolution)]
    short, smallest = min(seen.width, seen.height), min(min(b) for b in shapes)
    skip = min_side(cfg.min_bucket_reso)
    if short < skip:
        return [Finding(
            seen.name, "too_small", "error",
            f"{seen.size}: the shorter side is under {skip} px (64, or min_bucket_reso / 4), so training skips it",
            f"Use a larger original (at least {smallest} px on the shorter side), or delete it.")]
    found = []
    if short < smallest:
        scale = max(bucket[0] / seen.width, bucket[1] / seen.height)
        what = (f"trained at {bucket[0]}x{bucket[1]} (bucket_no_upscale)" if cfg.bucket_no_upscale
                else f"enlarged x{scale:.1f} to its bucket {bucket[0]}x{bucket[1]}, so it comes out soft")
        found.append(Finding(
            seen.name, "too_small", "warning",
            f"{seen.size} is below the smallest bucket side, {smallest} px (min_bucket_reso): {what}",
            f"Use a larger original (at least {smallest} px on the shorter side), or lower min_bucket_reso."))
    crop = plan_crop(record(seen, ""), bucket)
    lost = 1 - bucket[0] * bucket[1] / (crop.resized[0] * crop.resized[1])
    ratio = seen.width / seen.height
    widest = max(shapes, key=lambda b: b[0] / b[1])
    tallest = min(shapes, key=lambda b: b[0] / b[1])
    if lost > MAX_CROP and not tallest[0] / tallest[1] <= ratio <= widest[0] / widest[1]:
        side, edge = ("wide", widest) if ratio > 1 else ("tall", tallest)
        fix = ("Crop it to the part that matters, or split it in two"
               + (", or raise max_bucket_reso." if cfg.enable_bucket else ", or set enable_bucket: true."))
        found.append(Finding(
            seen.name, "extreme_aspect", "warning",
            f"{seen.size} is {_ratio(ratio)}, more {side} than the most {side} bucket {edge[0]}x{edge[1]} "
            f"({_ratio(edge[0] / edge[1])}): {lost:.0%} of it is cropped away", fix))
    return found


def bucket_of(seen: Look, buckets: list[Bucket], cfg: TrainConfig) -> Bucket:
    return assign_bucket(seen.width, seen.height, buckets, cfg)


def _ratio(r: float) -> str:
    return f"{r:.2f}:1" if r >= 1 else f"1:{1 / r:.2f}"
