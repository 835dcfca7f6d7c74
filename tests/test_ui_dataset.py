"""The tab's dataset side without gradio: Load runs the dataset doctor, Add images copies uploads (files or a zip)
into the Image folder safely, the captioner weights picker."""

from __future__ import annotations

import shutil
import types
import zipfile
from pathlib import Path

import pytest


def _truncated(path: Path, source: Path) -> Path:
    path.write_bytes(source.read_bytes()[:300])
    return path


@pytest.fixture
def messy(demo_folder):
    """The demo folder with a truncated PNG first in name order and a copy of another image."""
    _truncated(demo_folder / "000_broken.png", demo_folder / "img001.png")
    shutil.copy(demo_folder / "img002.png", demo_folder / "img002_copy.png")
    return demo_folder


def test_load_shows_the_doctors_findings_and_names_the_unreadable(messy):
    from lora_trainer.data.doctor import TABLE_COLUMNS
    from lora_trainer.ui.dataset_panel import look_at

    pictures, rows, findings, status = look_at(str(messy), "inkwash")
    assert len(rows) == 10 and len(pictures) == 9  # every caption is editable; the gallery shows what decodes
    assert all("000_broken" not in path for path, _ in pictures)
    by_file = {(row[0], row[1]): dict(zip(TABLE_COLUMNS, row)) for row in findings}
    broken = by_file["000_broken.png", "unreadable"]
    assert broken["severity"] == "error" and broken["fix"]
    assert by_file["img002_copy.png", "duplicate"]["fix"].startswith("Delete")
    first, second = status.splitlines()[:2]
    assert first.startswith("10 images, 9 usable; 1 error(s)")
    assert "Training skips 1: 000_broken.png (unreadable)" in second


def test_load_checks_against_the_forms_settings_and_says_when_it_cannot(demo_folder):
    from lora_trainer.ui import preset_values
    from lora_trainer.ui.dataset_panel import look_at

    advanced = {**preset_values("style", False), "epochs": 3, "repeats": 2, "batch_size": 2}
    status = look_at(str(demo_folder), "", "style", False, advanced)[3]
    assert status.splitlines()[0].endswith("8 steps per epoch, 24 in total")  # 8 images x 2 repeats / batch 2 x 3
    status = look_at(str(demo_folder), "", "style", False, {**advanced, "lora_ran": 4})[3]
    assert "Checked with the default settings" in status and "lora_rank" in status


def test_load_errors_name_the_tabs_fields(tmp_path):
    from lora_trainer.ui.dataset_panel import look_at

    assert look_at(str(tmp_path / "nope")) == ([], [], [], f"Image folder not found: {tmp_path / 'nope'}")
    assert "Image folder" in look_at("")[3]


def test_add_images_copies_checks_and_never_overwrites(demo_folder, tmp_path):
    from lora_trainer.ui.dataset_panel import add_images

    folder = tmp_path / "new" / "images"  # made when missing
    uploads = [str(demo_folder / "img001.png"), str(demo_folder / "img002.png"),
               str(_truncated(tmp_path / "bad.png", demo_folder / "img003.png"))]
    pictures, rows, findings, status = add_images(uploads, str(folder))
    assert sorted(p.name for p in folder.iterdir()) == ["img001.png", "img002.png"]
    assert status.startswith(f"Added 2 file(s) to {folder}: img001.png; img002.png")
    assert "Not added (1): bad.png (" in status and len(rows) == 2 and len(pictures) == 2
    assert "2 images, 2 usable" in status  # then Load ran

    add_images([str(demo_folder / "img001.png")], str(folder))  # the same name again: a new name, the old file kept
    assert (folder / "img001-v2.png").read_bytes() == (folder / "img001.png").read_bytes()
    assert add_images([str(demo_folder / "img001.png")], " ")[3].startswith("Pick the Image folder first")


def test_add_images_takes_gradio3_file_wrappers_and_gradio4_paths(demo_folder, tmp_path):
    from lora_trainer.ui.uploads import upload_paths

    class NamedString(str):  # gradio 4: a str path with .name
        def __init__(self, *args):
            super().__init__()
            self.name = str(self)

    copy = tmp_path / "cache" / "0123abcd" / "my photo.png"
    copy.parent.mkdir(parents=True)
    wrapper = types.SimpleNamespace(name=str(copy), orig_name="C:\\Users\\me\\my photo.png")  # gradio 3.41
    assert upload_paths([wrapper, NamedString(str(copy))]) == [("my photo.png", copy), ("my photo.png", copy)]
    assert upload_paths(None) == [] and upload_paths(str(copy)) == [("my photo.png", copy)]


def test_a_zip_is_unpacked_flat_safely_with_its_captions(demo_folder, tmp_path):
    from lora_trainer.ui.uploads import add_files

    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(demo_folder / "img001.png", folder / "a.png")  # taken: the zip's a.png and its caption get -v2
    png = (demo_folder / "img002.png").read_bytes()
    archive = tmp_path / "upload.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("set/a.png", png)
        z.writestr("set/a.txt", "inkwash, a house")
        z.writestr("../../escape.png", png)  # only the base name is used: it lands in the folder
        z.writestr("/abs/b.png", (demo_folder / "img003.png").read_bytes())
        z.writestr("set/broken.png", png[:300])
        z.writestr("set/run.sh", "rm -rf /")
        z.writestr("__MACOSX/set/._a.png", b"\0")
        z.writestr("set/metadata.csv", "file_name,caption\nb.png,a tree\n")
    added = add_files(str(folder), [("upload.zip", archive)])
    assert sorted(added.added) == ["a-v2.png", "a-v2.txt", "b.png", "escape.png", "metadata.csv"]
    assert (folder / "a-v2.txt").read_text() == "inkwash, a house"
    assert sorted(p.name for p in folder.iterdir()) == sorted(["a.png", *added.added])  # nothing outside, flat
    assert not (tmp_path / "escape.png").exists() and not list(tmp_path.glob("../escape.png"))
    refused = dict(added.refused)
    assert set(refused) == {"upload.zip/set/broken.png", "upload.zip/set/run.sh"}
    assert refused["upload.zip/set/run.sh"] == "not an image or caption file"

    again = add_files(str(folder), [("upload.zip", archive)])  # the folder's own metadata.csv is kept
    assert ("upload.zip/set/metadata.csv", "the folder has its own metadata.csv: kept") in again.refused
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    assert add_files(str(folder), [("bad.zip", bad)]).refused[0][1].startswith("not a readable zip")


class _Weights:
    def __init__(self, folder):
        self.folder = folder

    def captioner_weights_dir(self):
        return self.folder

    def new_task_id(self):
        return ""


def test_captioner_weights_picker(tmp_path, monkeypatch):
    from lora_trainer.errors import CaptionError
    from lora_trainer.ui.dataset_panel import AUTO_WEIGHTS, weight_choices, weights_option

    monkeypatch.setenv("LORA_TRAINER_CACHE", str(tmp_path / "cache"))
    backend = _Weights(tmp_path / "models" / "lora_trainer" / "captioner")
    assert weight_choices(backend)[0] == AUTO_WEIGHTS
    (backend.folder / "sub").mkdir(parents=True)
    (backend.folder / "sub" / "coca.safetensors").write_bytes(b"0")
    (backend.folder / "notes.txt").write_text("")
    assert str(backend.folder / "sub" / "coca.safetensors") in weight_choices(backend)
    assert str(backend.folder / "notes.txt") not in weight_choices(backend)
    assert weights_option(AUTO_WEIGHTS, backend) == weights_option("", backend) == "mscoco_finetuned_laion2B-s13B-b90k"
    assert weights_option(str(backend.folder / "sub" / "coca.safetensors"), backend).endswith("coca.safetensors")
    with pytest.raises(CaptionError, match="Captioner weights: no file at /nowhere/w.safetensors") as e:
        weights_option("/nowhere/w.safetensors", backend)
    assert str(backend.folder) in str(e.value) and "--" not in str(e.value)


def test_an_empty_image_folder_is_never_the_working_folder(tmp_path, monkeypatch):
    from lora_trainer.ui.dataset_panel import caption_empty, save_captions

    monkeypatch.chdir(tmp_path)
    backend = _Weights(tmp_path / "w")
    backend.caption = lambda *a, **k: pytest.fail("captioned the working folder")
    assert save_captions("  ", [["a.png", "x"]]) == "Pick the Image folder first."
    assert caption_empty(backend, "", "", "", "")[3].startswith("Pick the Image folder first.")
    assert not list(tmp_path.iterdir())
