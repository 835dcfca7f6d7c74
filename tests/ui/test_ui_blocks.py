"""The tab's Blocks under the installed gradio (3.41.2 or 4.40.0): it builds, and its handlers load a folder (with
the dataset doctor's findings), add uploaded files, save edited captions, caption with the picked weights, train the
tiny model with a live loss plot and render the test grid."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import TinyBackend  # noqa: E402

EXPECTED = {"gradio3": "3.41.2", "gradio4": "4.40.0", "gradio6": "6.31.0"}  # A1111, Forge, `pip install gradio`


def _handlers(blocks):
    fns = blocks.fns.values() if isinstance(blocks.fns, dict) else blocks.fns
    return {f.fn.__name__: f.fn for f in fns if f.fn is not None}


@pytest.fixture
def tiny_backend(tmp_path, tiny_sd1):
    return TinyBackend(tmp_path / "runs", components=tiny_sd1, sample_steps=2, sample_size=64)


@pytest.fixture
def built(tmp_path, tiny_backend):
    import gradio as gr

    from lora_trainer.ui import build_blocks

    assert gr.__version__ == EXPECTED[os.environ["LORA_TRAINER_UI"]]
    return _handlers(build_blocks(tiny_backend)), tmp_path


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
    as_text = {k: ", ".join(map(str, v)) for k, v in shown.items() if isinstance(v, list)}  # a list field's textbox
    assert [u["value"] for u in updates] == [as_text.get(k, shown[k]) for k in touched]
    assert shown["lora_rank"] == 32 and shown["gradient_checkpointing"] is True


def test_folder_captions_train_and_grid(built, tiny_backend, demo_folder, tiny_coca, monkeypatch):
    from huggingface_hub import constants

    from lora_trainer.adapters.export import read_lora
    from lora_trainer.ui import preset_values

    h, tmp_path = built

    adv = list(preset_values("style", False).values())  # what the form shows
    pics, rows, findings, status = h["on_load"](str(demo_folder), "inkwash", "style", False, *adv)
    assert len(rows) == 8 and len(pics) == 8 and status.startswith("8 images, 8 usable")
    rows[0][1] = "inkwash, a red house"
    assert "saved 8 captions" in h["on_save"](str(demo_folder), rows)
    assert h["on_load"](str(demo_folder), "inkwash", "style", False, *adv)[1][0][1] == "inkwash, a red house"

    updates = list(h["on_train"]("", str(demo_folder), "inkwash", "tiny-lora", "", "style", False, *adv))
    message, plot, sample = updates[-1]
    assert message.startswith("Done: 3 steps"), message
    assert plot.size == (512, 256) and sample and Path(sample).is_file()
    assert (tmp_path / "runs" / "tiny-lora" / "tiny-lora.safetensors").is_file()

    lora = tmp_path / "runs" / "tiny-lora" / "tiny-lora.safetensors"
    hint = read_lora(lora, with_tensors=False)[1]["modelspec.usage_hint"]
    assert hint == "<lora:tiny-lora:0.7> inkwash"
    # Without the captioner's weights: the plain grid, and the status says why it has no scores.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    grid, infotext, status = h["on_test"]("", "inkwash house", 1, "(auto)")
    assert grid is not None and grid.width > grid.height and "0.5, 0.6, 0.7, 0.8" in status
    assert infotext == ""  # standalone: no txt2img to send parameters to
    assert "scoring skipped: Captioner weights for coca_ViT-L-14" in status and '"Captioner weights"' in status
    assert (lora.with_suffix(".grid.png")).is_file()
    assert read_lora(lora, with_tensors=False)[1]["modelspec.usage_hint"] == hint  # nothing written

    # With them (the tiny CoCa): the scores under each column, the best strength in the status and the usage hint.
    config, weights, _ = tiny_coca
    tiny_backend.captioner_model = str(config)
    before = lora.read_bytes()
    scored, infotext, status = h["on_test"]("", "inkwash house", 1, str(weights))
    lines = status.splitlines()
    assert lines[0] == "grid at strengths 0, 0.5, 0.6, 0.7, 0.8" and lines[1].startswith("best strength 0.")
    best = lines[1].split()[2]
    assert scored.width == grid.width and scored.height > grid.height  # one more line: the scores
    after = read_lora(lora, with_tensors=False)[1]["modelspec.usage_hint"]
    assert after == f"<lora:tiny-lora:{best}> inkwash" and lines[2].endswith(after)
    tensor_bytes = [b[8 + int.from_bytes(b[:8], "little"):] for b in (before, lora.read_bytes())]
    assert tensor_bytes[0] == tensor_bytes[1]  # the weights, byte for byte
    assert h["on_test"]("", "inkwash house", 1, str(weights))[2] == status  # same seed, same scores


def test_bad_name_is_shown_not_raised(built, demo_folder):
    h, _ = built
    from lora_trainer.ui import preset_values

    adv = list(preset_values("style", False).values())
    message, _, _ = next(h["on_train"]("", str(demo_folder), "", "../escape", "", "style", False, *adv))
    assert "LoRA name" in message


def test_load_shows_findings_and_add_images_takes_this_gradios_file_values(built, demo_folder, tmp_path):
    """gr.File hands the handler tempfile wrappers (3.x) or str paths (4.x): the component's own preprocess makes
    them here from uploaded files, as a browser upload would."""
    import gradio as gr

    h, _ = built
    from lora_trainer.ui import preset_values

    adv = list(preset_values("style", False).values())
    folder = tmp_path / "added"
    (tmp_path / "broken.png").write_bytes((demo_folder / "img001.png").read_bytes()[:300])
    uploads = [demo_folder / "img001.png", demo_folder / "img001.png", tmp_path / "broken.png"]
    value = _file_value(gr, uploads)
    pics, rows, findings, status, cleared = h["on_add"](value, str(folder), "inkwash", "style", False, *adv)
    assert sorted(p.name for p in folder.iterdir()) == ["img001-v2.png", "img001.png"] and cleared is None
    assert status.startswith(f"Added 2 file(s) to {folder}") and "broken.png (" in status
    assert "duplicate" in [f[1] for f in findings]  # Load ran on the new folder: two copies of one image
    assert len(pics) == 2 and len(rows) == 2

    (folder / "000_broken.png").write_bytes((tmp_path / "broken.png").read_bytes())
    pics, rows, findings, status = h["on_load"](str(folder), "inkwash", "style", False, *adv)
    assert findings[0][:3] == ["000_broken.png", "unreadable", "error"] and findings[0][4]
    assert "Training skips 1: 000_broken.png (unreadable)" in status
    # what the Dataframe sends to the page: the findings with their fix column
    table = gr.Dataframe(headers=["file", "problem", "severity", "detail", "fix"], type="array")
    shown = table.postprocess(findings)
    data = shown["data"] if isinstance(shown, dict) else shown.data
    assert data[0][0] == "000_broken.png" and len(data[0]) == 5
    empty = table.postprocess([])
    assert (empty["data"] if isinstance(empty, dict) else empty.data) in ([], [[]], [["", "", "", "", ""]])


def _file_value(gr, paths):
    """What a multiple gr.File passes to its handler for these uploaded files, under this gradio."""
    component = gr.File(file_count="multiple")
    if int(gr.__version__.split(".")[0]) >= 4:
        from gradio.data_classes import FileData, ListFiles

        return component.preprocess(ListFiles(root=[FileData(path=str(p), orig_name=p.name) for p in paths]))
    return component.preprocess([{"name": str(p), "data": None, "is_file": True, "orig_name": p.name} for p in paths])


def test_caption_uses_the_picked_weights_and_names_the_field(built, demo_folder, monkeypatch, tmp_path):
    import lora_trainer.data.captions as captions
    from lora_trainer.data.captions import MissingWeights

    h, _ = built
    from lora_trainer.ui import preset_values

    adv = list(preset_values("style", False).values())
    weights = tmp_path / "coca.safetensors"
    weights.write_bytes(b"0")
    seen = []

    def no_weights(folder, options=None, callbacks=None, **_):
        seen.append(options.pretrained)
        raise MissingWeights(options.model, "mscoco_finetuned_laion2B-s13B-b90k", tmp_path / "c", "https://hf/x.bin")
        yield

    monkeypatch.setattr(captions, "caption_folder", no_weights)
    status = h["on_caption"]("", str(demo_folder), str(weights), "inkwash", "style", False, *adv)[3]
    assert seen == [str(weights)] and '"Captioner weights"' in status and "--pretrained" not in status
    assert h["on_weights_refresh"]()["choices"]  # (auto) at least


def test_merge_into_checkpoint_from_the_standalone_tab(tmp_path, tiny_sd1, tiny_sd1_file, demo_folder):
    """The merge panel's handlers: after Train the fields offer the file's usage-hint weight and the default name, a
    changed strength renames a default name (a typed one stays), Merge writes beside the base (the standalone's
    checkpoint folder) and never over an existing file."""
    import shutil

    from lora_trainer.ui import build_blocks, preset_values

    models = tmp_path / "models"
    models.mkdir()
    base = Path(shutil.copy(tiny_sd1_file, models / "tiny-sd1.safetensors"))
    backend = TinyBackend(tmp_path / "runs", base_model=str(base), components=tiny_sd1, sample_steps=2, sample_size=64)
    h = _handlers(build_blocks(backend))
    adv = list(preset_values("style", False).values())
    message = list(h["on_train"]("", str(demo_folder), "inkwash", "tiny-lora", str(base), "style", False, *adv))[-1][0]
    assert message.startswith("Done: 3 steps"), message
    assert h["on_fields"](str(base), "") == (0.7, "tiny-sd1+tiny-lora-0.7.safetensors")  # the usage hint's 0.7
    assert h["on_name"](str(base), 0.5, "tiny-sd1+tiny-lora-0.7.safetensors") == "tiny-sd1+tiny-lora-0.5.safetensors"
    assert h["on_name"](str(base), 0.5, "my merge") == "my merge"

    updates = list(h["on_merge"](str(base), 0.5, "tiny-sd1+tiny-lora-0.5.safetensors"))
    out = models / "tiny-sd1+tiny-lora-0.5.safetensors"
    status = updates[-1][0]
    assert status.startswith(f"Merged tiny-lora.safetensors at 0.5 into tiny-sd1.safetensors: {out} ("), status
    assert out.is_file() and len(status.splitlines()) == 1  # the standalone has no checkpoint list to refresh
    again = list(h["on_merge"](str(base), 0.5, "tiny-sd1+tiny-lora-0.5.safetensors"))[-1][0]
    assert again == f'{out} already exists and is never overwritten: give another name in "Merged checkpoint name".'
    assert list(h["on_merge"]("", "x", ""))[-1][0].startswith("Strength 'x': give a number")
