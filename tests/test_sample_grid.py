"""The labelled strength grid: labels stay inside their column whatever the picture size and Pillow's font."""

from __future__ import annotations

import pytest
from PIL import Image, ImageFont


def _dark_columns(grid, top, bottom):
    """x positions with any dark pixel between rows `top` and `bottom`."""
    px = grid.convert("L").load()
    return {x for x in range(grid.width) for y in range(top, bottom) if px[x, y] < 128}


@pytest.mark.parametrize("font", ["pillow", "bitmap"])  # bitmap: the only default font of Pillow 9.5 (A1111's pin)
@pytest.mark.parametrize("size", [48, 64, 512])
def test_column_labels_fit_their_column(monkeypatch, font, size):
    from lora_trainer.evaluate import sample

    if font == "bitmap":  # Pillow >= 10.1 names it load_default_imagefont; before, it is what load_default gives
        bitmap = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)
        monkeypatch.setattr(sample, "_label_font", lambda px: (bitmap(), 11))
    labels = [f"strength {w:g}" for w in (0.0, 0.5, 0.6, 0.7, 0.8)]
    pictures = [Image.new("RGB", (size, size), "lightgrey") for _ in labels]
    grid = sample.label_grid([pictures], labels, ["a long prompt " * 20], seed=3)
    edge = grid.convert("L").load()
    top = min(y for y in range(grid.height) if edge[1, y] < 255)  # x=1: no text there, only the picture
    dark = _dark_columns(grid, 0, top)
    for c in range(len(labels)):
        inside = {x for x in dark if c * size <= x < (c + 1) * size}
        assert inside, f"column {c} has no label"
        assert min(inside) >= c * size + 3, f"the label of column {c - 1} runs into column {c}"
    footer = _dark_columns(grid, top + size, grid.height)
    assert footer and max(footer) < grid.width - 2  # the prompt is cut at the grid's edge


def test_labels_grow_with_the_pictures_where_pillow_can():
    from lora_trainer.evaluate.sample import _label_font, label_grid

    small = label_grid([[Image.new("RGB", (64, 64), "white")]], ["0.5"], ["p"], seed=1)
    large = label_grid([[Image.new("RGB", (1024, 1024), "white")]], ["0.5"], ["p"], seed=1)
    if _label_font(25)[1] == 25:  # Pillow >= 10.1: a scalable default font
        assert large.height - 1024 > small.height - 64  # taller header and footer for a larger font
    else:  # Pillow 9.5 (A1111's pin): the one bitmap size
        assert large.height - 1024 == small.height - 64
