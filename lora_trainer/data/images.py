"""Opening one training image safely: the part of the dataset stage that touches pixels.

`load_image` decodes a file completely (so a truncated file fails here, before training, not
in step 300), refuses decompression bombs, and returns an 8-bit RGB image with the EXIF
orientation applied, plus a list of what it had to fix. The same function is used when the
dataset is scanned and when an image is prepared for a batch, so both see the same pixels.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageFile, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# Decoders we open; anything else under an image extension is refused. MPO (multi-picture JPEGs from cameras)
# is its own format in older Pillow and part of JPEG in newer ones.
_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "DIB")
# Used when a host has switched Pillow's own limit off (Image.MAX_IMAGE_PIXELS = None): Pillow's default.
DEFAULT_MAX_PIXELS = 89_478_485
MIN_SIDE = 64
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")  # Pillow modes with an alpha channel
MASK_SUFFIX = "_mask"  # <name>_mask.png beside <name>.jpg: the image's loss mask (masked_loss)
_ORIENTATION_TAG = 0x0112


class ImageLoadError(Exception):
    """One image cannot be used; the message is the one-line reason shown in the report."""


@dataclass
class LoadedImage:
    image: Image.Image  # mode RGB, EXIF orientation applied
    content_hash: str  # sha1 hex of the file's bytes
    fixes: list[str] = field(default_factory=list)


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder` (no subfolders, no hidden files), sorted by name; an image's loss mask
    (`<name>_mask.png` beside `<name>.jpg`, see masks.py) is not an image of its own."""
    files = [p for p in Path(folder).iterdir()
             if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS]
    stems = {p.stem for p in files}
    return sorted((p for p in files if not (p.stem.endswith(MASK_SUFFIX) and p.stem[:-len(MASK_SUFFIX)] in stems)),
                  key=lambda p: p.name)


def _formats() -> tuple[str, ...]:
    Image.init()  # registers every plugin once; cheap afterwards
    return tuple(f for f in _FORMATS if f in Image.OPEN)


def max_pixels() -> int:
    return Image.MAX_IMAGE_PIXELS or DEFAULT_MAX_PIXELS


def min_side(min_bucket_reso: int) -> int:
    """Shorter side below which an image is skipped as too small: 64 px, or min_bucket_reso / 4 if larger."""
    return max(MIN_SIDE, min_bucket_reso // 4)


def load_image(path: Path) -> LoadedImage:
    """Read, fully decode and normalize one image; raise ImageLoadError with a one-line reason."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ImageLoadError(f"cannot read the file ({e.strerror or e})") from None
    digest = hashlib.sha1(data).hexdigest()
    if not data:
        raise ImageLoadError("empty file (0 bytes)")
    limit = max_pixels()
    size = None
    try:
        with warnings.catch_warnings(), _strict_decoding():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)  # e.g. palette transparency notes; we handle those modes
            img = Image.open(io.BytesIO(data), formats=_formats())
            size = img.size
            if size[0] * size[1] > limit:  # checked here too: Pillow skips its own check when the limit is None
                raise Image.DecompressionBombError("")
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        what = f"{size[0]}x{size[1]} pixels" if size else f"{int(found.group(1)):,} pixels" if found else "image"
        raise ImageLoadError(
            f"too large: {what} is over the limit of {limit:,} (Pillow's decompression-bomb guard); resize it first"
        ) from None
    except Image.UnidentifiedImageError:
        raise ImageLoadError("not a readable JPEG/PNG/WebP/BMP image (corrupt, or another format renamed)") from None
    except Exception as e:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError, EOFError, zlib.error ...
        reason = str(e).split("\n")[0] or type(e).__name__
        if "truncated" in reason:
            reason = "file is truncated (incomplete download or copy)"
        raise ImageLoadError(f"cannot decode the image: {reason}") from None
    fixes: list[str] = []
    img = _apply_orientation(img, fixes)
    img = _to_rgb(img, fixes)
    return LoadedImage(img, digest, fixes)


@contextlib.contextmanager
def _strict_decoding() -> Iterator[None]:
    """Make truncated files fail even if a host set ImageFile.LOAD_TRUNCATED_IMAGES (which pads them grey)."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _apply_orientation(img: Image.Image, fixes: list[str]) -> Image.Image:
    try:
        orientation = int(img.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block is not worth losing the image over
        return img
    if orientation not in range(2, 9):
        return img
    turned = ImageOps.exif_transpose(img)
    if turned is None:  # Pillow >= 9.4 with in_place; kept for safety
        turned = img
    fixes.append(f"EXIF orientation {orientation} applied (now {turned.width}x{turned.height})")
    return turned


def _to_rgb(img: Image.Image, fixes: list[str]) -> Image.Image:
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I") or mode == "F":
        fixes.append(f"{_describe_mode(mode)} scaled to 8-bit RGB")
        return _high_bit_depth_to_rgb(img)
    if mode in ALPHA_MODES or "transparency" in img.info:
        fixes.append(f"transparency ({mode}) composited on white")
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode not in ("L", "P", "1"):  # greyscale and plain palettes are ordinary images: convert quietly
        fixes.append(f"{mode} converted to RGB")
    return img.convert("RGB")


def _describe_mode(mode: str) -> str:
    # Of the formats we open only 16-bit PNGs decode to I modes (I;16 in newer Pillow, I in older ones).
    return "32-bit float greyscale (F)" if mode == "F" else f"16-bit greyscale ({mode})"


def _high_bit_depth_to_rgb(img: Image.Image) -> Image.Image:
    """Scale 16/32-bit greyscale to 0..255; Pillow's own convert clips everything above 255 to white."""
    import numpy as np

    arr = np.asarray(img).astype(np.float64)
    top = float(arr.max()) if arr.size else 0.0
    if img.mode == "F" and top <= 1.0:
        arr = arr * 255.0
    elif top > 255.0:
        arr = arr / 257.0  # 65535 -> 255
    grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")
