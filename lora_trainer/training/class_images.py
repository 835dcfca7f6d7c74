"""`reg_generate: N`: the class images a run regularizes with, made by the base model before the first step.

The images go into reg_data_dir as `class_0000.png` … with `class_prompt` as their `.txt` caption, one seed
each (seed + i), at the training resolution, with the LoRA at strength 0 (the base model exactly, also when
training starts from init_lora). Only the missing ones are made: a folder that already holds N images is used as
it is, so a second run, or a resumed one, makes none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..callbacks import Callbacks
from ..config import TrainConfig
from ..data.dataset import missing_class_images
from ..files import atomic_write_text, atomic_write_with


def make_class_images(cfg: TrainConfig, components: Any, device: Any, callbacks: Callbacks) -> int:
    """Render the missing class images into reg_data_dir; returns how many were made."""
    from ..evaluate.sample import render_images

    count = missing_class_images(cfg)
    folder = Path(cfg.reg_data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    made, index = 0, 0
    while made < count:
        path = folder / f"class_{index:04d}.png"
        index += 1
        if path.exists():  # a user's own file of that name stays
            continue
        callbacks.on_status(f"making class images {made + 1}/{count}: {cfg.class_prompt}")
        image = render_images(components, [cfg.class_prompt], [0.0], seed=cfg.seed + index - 1,
                              steps=cfg.sample_steps, device=device, size=cfg.resolution)[0][0]
        atomic_write_text(path.with_suffix(cfg.caption_extension), cfg.class_prompt)
        atomic_write_with(path, lambda tmp: image.save(tmp, format="PNG"))  # the caption first: never a bare image
        made += 1
    return made
