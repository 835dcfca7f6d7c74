"""The tab's Blocks under the installed gradio (3.41.2 or 4.40.0): it builds, and its handlers load a folder,
save edited captions, train the tiny model with a live loss plot and render the test grid."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import TinyBackend  # noqa: E402

EXPECTED = {"gradio3": "3.41.2", "gradio4": "4.40.0"}


def _handlers(blocks):
    fns = blocks.fns.values() if isinstance(blocks.fns, dict) else blocks.fns
    return {f.fn.__name__: f.fn for f in fns if f.fn is not None}


@pytest.fixture
def built(tmp_path, tiny_sd1):
    import gradio as gr

    from lora_trainer.ui import build_blocks

    assert gr.__version__ == EXPECTED[os.environ["LORA_TRAINER_UI"]]
    backend = TinyBackend(tmp_path / "runs", components=tiny_sd1, sample_steps=2, sample_size=64)
    return _handlers(build_blocks(backend)), tmp_path


def test_blocks_build_with_generated_advanced_form():
    import gradio as gr

    from lora_trainer.ui import advanced_fields, build_blocks

    blocks = build_blocks(TinyBackend())
    labels = {getattr(b, "label", None) for b in blocks.blocks.values()}
    assert set(advanced_fields()) <= labels and "Trigger word" in labels
    assert isinstance(blocks, gr.Blocks)


def test_advanced_form_shows_and_follows_the_preset():
    from lora_trainer.ui import PRESET_FIELDS, PRESETS, advanced_fields, build_blocks, preset_values

    blocks = build_blocks(TinyBackend())
    by_label = {getattr(b, "label", None): b for b in blocks.blocks.values()}
    assert by_label["lora_alpha"].value == PRESETS["style"]["lora_alpha"]  # the initial preset's, not the config's 32
    assert by_label["flip_aug"].value is True
    # Changing the preset or Low VRAM sets every field they touch, in form order.
    touched = [k for k in advanced_fields() if k in PRESET_FIELDS]
    assert {"lora_rank", "lora_alpha", "flip_aug", "gradient_checkpointing"} <= set(touched)
    updates = _handlers(blocks)["on_preset"]("character", True)
    shown = preset_values("character", True)
    assert [u["value"] for u in updates] == [shown[k] for k in touched]
    assert shown["lora_rank"] == 32 and shown["gradient_checkpointing"] is True


def test_folder_captions_train_and_grid(built, demo_folder):
    h, tmp_path = built
    pics, rows, status = h["on_load"](str(demo_folder))
    assert len(rows) == 8 and len(pics) == 8 and "8 images" in status
    rows[0][1] = "inkwash, a red house"
    assert "saved 8 captions" in h["on_save"](str(demo_folder), rows)
    assert h["on_load"](str(demo_folder))[1][0][1] == "inkwash, a red house"

    from lora_trainer.ui import preset_values

    adv = list(preset_values("style", False).values())  # what the form shows
    updates = list(h["on_train"]("", str(demo_folder), "inkwash", "tiny-lora", "", "style", False, *adv))
    message, plot, sample = updates[-1]
    assert message.startswith("Done: 3 steps"), message
    assert plot.size == (480, 220) and sample and Path(sample).is_file()
    assert (tmp_path / "runs" / "tiny-lora" / "tiny-lora.safetensors").is_file()

    grid, infotext, status = h["on_test"]("", "inkwash house", 1)
    assert grid is not None and grid.width > grid.height and "0.5, 0.6, 0.7, 0.8" in status
    assert infotext == ""  # standalone: no txt2img to send parameters to


def test_bad_name_is_shown_not_raised(built, demo_folder):
    h, _ = built
    from lora_trainer.ui import preset_values

    adv = list(preset_values("style", False).values())
    message, _, _ = next(h["on_train"]("", str(demo_folder), "", "../escape", "", "style", False, *adv))
    assert "LoRA name" in message
