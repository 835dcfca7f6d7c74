"""A tiny synthetic image set for `python -m lora_trainer demo` and the tests: no binary files in the repo.

Flat coloured shapes with a dark outline on plain backgrounds, one consistent "style", captioned
in the seed `metadata.csv` format (`img001.png,a red circle on a teal background, flat style`).
"""

from __future__ import annotations

import io
from pathlib import Path

from ..data.captions import write_captions
from ..files import atomic_write_bytes

_COLOURS = {
    "red": (214, 48, 49), "orange": (230, 126, 34), "yellow": (241, 196, 15), "green": (39, 174, 96),
    "blue": (41, 128, 185), "purple": (142, 68, 173), "pink": (232, 67, 147), "white": (245, 245, 240),
}
_BACKGROUNDS = {
    "teal": (22, 160, 133), "navy": (30, 39, 73), "cream": (250, 240, 210), "grey": (127, 140, 141),
    "black": (20, 20, 20),
}
_SHAPES = ("circle", "square", "triangle", "diamond")


def make_demo_images(folder: str | Path, n: int = 8, size: int = 96) -> Path:
    """Draw `n` images of `size` px into `folder` with a metadata.csv; the same arguments give the same files."""
    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    colours, backgrounds = list(_COLOURS), list(_BACKGROUNDS)
    captions = {}
    for i in range(n):
        shape = _SHAPES[i % len(_SHAPES)]
        colour = colours[(i * 3) % len(colours)]
        background = backgrounds[(i * 2 + i // len(backgrounds)) % len(backgrounds)]
        img = Image.new("RGB", (size, size), _BACKGROUNDS[background])
        draw = ImageDraw.Draw(img)
        margin, outline = size // 5, max(1, size // 24)
        box = (margin, margin, size - margin, size - margin)
        fill, line = _COLOURS[colour], (25, 25, 25)
        if shape == "circle":
            draw.ellipse(box, fill=fill, outline=line, width=outline)
        elif shape == "square":
            draw.rectangle(box, fill=fill, outline=line, width=outline)
        else:
            mid, lo, hi = size // 2, margin, size - margin
            points = [(mid, lo), (hi, hi), (lo, hi)] if shape == "triangle" else [(mid, lo), (hi, mid), (mid, hi),
                                                                                  (lo, mid)]
            draw.polygon(points, fill=fill, outline=line)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        name = f"img{i + 1:03d}.png"
        atomic_write_bytes(folder / name, buf.getvalue())
        article = "an" if colour[0] in "aeiou" else "a"
        captions[name] = f"{article} {colour} {shape} on a {background} background, flat style"
    write_captions(folder, captions, fmt="csv")
    return folder
