"""Loss masks (`masked_loss`): where each image may be learned from, white = train, black = ignore.

A mask is found in this order: `<name>_mask.png` (any image extension) beside the image, `<name>.png` in
`mask_dir`, else the image's own alpha channel. It is read as 8-bit greyscale, resized to the image if its
size differs, and then cropped and flipped with the image (`dataset.fit_to_bucket`), so it always covers the
pixels it was drawn on. The loss is weighted by it at latent size (`latent_mask`), as kohya's scripts do.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

from PIL import Image

from .images import ALPHA_MODES, IMAGE_EXTENSIONS, MASK_SUFFIX, max_pixels


class MaskError(Exception):
    """A mask file that cannot be used; the message is the one-line reason."""


def find_mask(image: Path, mask_dir: str = "") -> Optional[Path]:
    """The mask file for `image`, or the image itself when it has an alpha channel, else None."""
    for ext in IMAGE_EXTENSIONS:
        for candidate in (image.with_name(f"{image.stem}{MASK_SUFFIX}{ext}"),
                          image.with_name(f"{image.stem}{MASK_SUFFIX}{ext.upper()}")):
            if candidate.is_file():
                return candidate
    if mask_dir:
        for ext in IMAGE_EXTENSIONS:
            candidate = Path(mask_dir) / f"{image.stem}{ext}"
            if candidate.is_file():
                return candidate
    return image if has_alpha(image) else None


def has_alpha(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            return img.mode in ALPHA_MODES or "transparency" in img.info
    except Exception:  # noqa: BLE001 - an unreadable image is the scan's to report
        return False


def read_mask(path: Path, image: Path) -> Image.Image:
    """The mask as stored, mode L, EXIF orientation applied (the alpha channel when `path` is the image itself);
    MaskError says why not."""
    from PIL import ImageOps

    try:
        with Image.open(io.BytesIO(Path(path).read_bytes())) as img:
            if img.width * img.height > max_pixels():
                raise MaskError(f"{path.name} is too large for a mask ({img.width}x{img.height})")
            img.load()
            img = ImageOps.exif_transpose(img) or img
            return img.convert("RGBA").getchannel("A") if path == image else img.convert("L")
    except MaskError:
        raise
    except Exception as e:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError, EOFError ...
        reason = str(e).split("\n")[0] or type(e).__name__
        raise MaskError(f"{path.name} is not a readable image ({reason})") from None


def load_mask(path: Path, image: Path, size: tuple[int, int]) -> Image.Image:
    """read_mask at `size`, the image's (w, h) after EXIF orientation."""
    mask = read_mask(path, image)
    return mask if mask.size == size else mask.resize(size, Image.Resampling.BILINEAR)


def latent_mask(mask: "object", latent_hw: tuple[int, int]) -> "object":
    """A (1, H, W) mask in [0, 1] at pixel size → (1, h, w) at latent size: each latent position's mean."""
    import torch.nn.functional as F

    return F.interpolate(mask[None], size=latent_hw, mode="area")[0]
