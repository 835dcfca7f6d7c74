"""The dataset doctor on generated folders: each problem on exactly its file(s), a clean folder clean."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from lora_trainer.data.captions import write_captions
from lora_trainer.cli.commands import main
from lora_trainer.config import TrainConfig
from lora_trainer.data.dataset import assign_bucket, batches_per_epoch, make_buckets, scan_images
from lora_trainer.data.doctor import PROBLEMS, TABLE_COLUMNS, examine
from lora_trainer.data.doctor.likeness import NEAR
from lora_trainer.data.doctor.pixels import signature
from lora_trainer.errors import DatasetError


def _scene(seed: int, size: tuple[int, int] = (256, 256)) -> Image.Image:
    """A gradient with six random shapes: every seed a different picture of the same kind."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = (x / w * rng.random() + y / h * rng.random())[..., None] / 2
    img = Image.fromarray((c0 * (1 - t) + c1 * t).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        ew, eh = (int(v) for v in rng.integers(min(w, h) // 8, min(w, h) // 2, 2))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x0 + ew, y0 + eh), fill=fill)
    return img.filter(ImageFilter.GaussianBlur(1))


def _jpeg(img: Image.Image, quality: int = 60) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


EDITS = {  # the near copies the doctor must recognise
    "half": lambda im: im.resize((im.width // 2, im.height // 2), Image.Resampling.LANCZOS),
    "jpeg60": _jpeg,
    "crop3": lambda im: im.crop((im.width * 3 // 100, im.height * 3 // 100, im.width * 97 // 100,
                                 im.height * 97 // 100)),
    "bright": lambda im: ImageEnhance.Brightness(im).enhance(1.2),
}


def _folder(tmp_path, images: dict[str, Image.Image], captions: dict[str, str] | None = None):
    folder = tmp_path / "data"
    folder.mkdir(exist_ok=True)
    for name, img in images.items():
        img.save(folder / name, **({"quality": 95} if name.endswith(".jpg") else {}))
    if captions is None:
        captions = {name: f"a picture of scene {i}, flat colours" for i, name in enumerate(images)}
    if captions:
        write_captions(folder, captions)
    return folder


def _found(report) -> dict[str, set[str]]:
    """problem code -> the files it was reported on."""
    out: dict[str, set[str]] = {}
    for f in report.findings:
        out.setdefault(f.problem, set()).add(f.file)
    return out


SIZES = [(512, 512), (640, 448), (448, 640), (768, 512), (512, 768)]


@pytest.fixture
def clean_folder(tmp_path):
    images = {f"scene{i:02d}.{'jpg' if i % 2 else 'png'}": _scene(i, SIZES[i % len(SIZES)]) for i in range(10)}
    return _folder(tmp_path, images, {n: f"zxq, a picture of scene {i}" for i, n in enumerate(images)})


# -- clean ----------------------------------------------------------------------------------

def test_a_clean_folder_has_no_finding(clean_folder):
    calls = []
    report = examine(clean_folder, trigger="zxq", on_progress=lambda done, total: calls.append((done, total)))
    assert report.findings == [] and report.ok
    assert report.images == report.usable == 10
    assert sum(report.buckets.values()) == 10 and "512x512" in report.buckets
    assert report.steps == {"per_epoch": 10, "total": 100}  # batch_size 1, epochs 10
    assert calls[0] == (0, 10) and calls[-1] == (10, 10)


def test_the_demo_folder_with_the_test_config_is_clean(make_cfg):
    report = examine(cfg=make_cfg())
    assert report.findings == [] and report.usable == 8


# -- images ---------------------------------------------------------------------------------

def test_unreadable_and_too_small_images(tmp_path):
    images = {"good.png": _scene(1, (512, 512)), "tiny.png": _scene(2, (40, 40)), "small.png": _scene(3, (200, 200))}
    folder = _folder(tmp_path, images)
    (folder / "corrupt.jpg").write_bytes(b"not an image" * 20)
    buf = io.BytesIO()
    _scene(4).save(buf, format="PNG")
    (folder / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    report = examine(folder)
    severity = {(f.file, f.problem): f.severity for f in report.findings}
    assert severity == {("corrupt.jpg", "unreadable"): "error", ("truncated.png", "unreadable"): "error",
                        ("tiny.png", "too_small"): "error", ("small.png", "too_small"): "warning"}
    assert report.images == 5 and report.usable == 2  # what training would use: good.png and small.png
    assert report.usable == len(scan_images(TrainConfig(train_data_dir=str(folder)))[0])
    small = next(f for f in report.findings if f.file == "small.png")
    assert "256 px (min_bucket_reso)" in small.detail and "512x512" in small.detail
    assert not report.ok


def test_too_small_follows_min_bucket_reso(tmp_path):
    folder = _folder(tmp_path, {"small.png": _scene(3, (200, 200))})
    assert examine(folder, TrainConfig(min_bucket_reso=192)).findings == []


def test_extreme_aspect_only_outside_the_bucket_range(tmp_path):
    images = {"wide.png": _scene(1, (2400, 300)), "tall.png": _scene(2, (300, 1600)),
              "widest_bucket.png": _scene(3, (1024, 256)), "photo.png": _scene(4, (768, 512))}
    report = examine(_folder(tmp_path, images))
    assert _found(report) == {"extreme_aspect": {"wide.png", "tall.png"}}
    wide = next(f for f in report.findings if f.file == "wide.png")
    assert "1024x256" in wide.detail and "cropped away" in wide.detail and "max_bucket_reso" in wide.fix


def test_without_buckets_a_non_square_image_is_cropped_hard(tmp_path):
    images = {"photo.png": _scene(4, (768, 512)), "square.png": _scene(5, (512, 512))}
    report = examine(_folder(tmp_path, images), TrainConfig(enable_bucket=False))
    assert _found(report) == {"extreme_aspect": {"photo.png"}}
    assert "enable_bucket: true" in report.findings[0].fix


# -- duplicates -----------------------------------------------------------------------------

def test_duplicates_are_the_same_pixels_whatever_the_name_or_format(tmp_path):
    base = _scene(1, (320, 256))
    rgba = base.convert("RGBA")  # opaque: composited on white it is the same picture
    images = {"a.png": base, "b_copy.png": base, "c.bmp": base, "d.webp": base, "e_alpha.png": rgba,
              "other.png": _scene(2, (320, 256))}
    folder = _folder(tmp_path, {k: v for k, v in images.items() if k != "d.webp"})
    base.save(folder / "d.webp", lossless=True)
    write_captions(folder, {n: f"picture {i}" for i, n in enumerate(images)})
    report = examine(folder)
    assert _found(report) == {"duplicate": {"b_copy.png", "c.bmp", "d.webp", "e_alpha.png"}}
    details = {f.file: f.detail for f in report.findings}
    assert details["b_copy.png"].startswith("an identical file as a.png")
    assert details["c.bmp"].startswith("the same pixels in another file as a.png")
    assert all(f.severity == "warning" for f in report.findings)


def test_near_duplicates_are_paired_and_different_scenes_are_not(tmp_path):
    original = _scene(7, (384, 384))
    images = {"a_original.png": original}
    images.update({f"copy_{name}.{'jpg' if name == 'jpeg60' else 'png'}": edit(original)
                   for name, edit in EDITS.items()})
    images.update({f"z_other{i:02d}.png": _scene(100 + i, (384, 384)) for i in range(12)})
    images["zz_exact.png"] = original  # an exact copy is a duplicate, not also a near duplicate
    report = examine(_folder(tmp_path, images), TrainConfig(min_bucket_reso=128))
    found = _found(report)
    assert found == {"near_duplicate": {f"copy_{n}.{'jpg' if n == 'jpeg60' else 'png'}" for n in EDITS},
                     "duplicate": {"zz_exact.png"}}
    group = {"a_original.png", *found["near_duplicate"]}
    for f in report.findings:
        if f.problem == "near_duplicate":
            named = f.detail.split(" ")[2]
            assert named in group - {f.file} and named in f.fix


def test_signature_calibration_keeps_its_margins():
    """Edits stay well above NEAR, different generated scenes well below (see likeness.py)."""
    scenes = [_scene(s) for s in range(30)]
    sigs = np.stack([signature(im) for im in scenes])
    similar = sigs @ sigs.T
    different = similar[np.triu_indices(len(scenes), 1)]
    assert different.max() < NEAR - 0.2
    for name, edit in EDITS.items():
        kept = [float(signature(edit(im)) @ s) for im, s in zip(scenes, sigs)]
        assert min(kept) > NEAR + 0.04, name
    flat = signature(Image.new("RGB", (64, 64), (200, 10, 10)))
    assert not flat.any()  # a flat picture has no shape to compare: never a near duplicate


# -- captions -------------------------------------------------------------------------------

@pytest.fixture
def caption_folder(tmp_path):
    images = {f"{n}.png": _scene(i, (512, 512)) for i, n in enumerate(["a", "b", "c", "d", "e"])}
    long_caption = "zxq, " + "cat " * 70 + "red hat on a blue whale"  # 79 tokens: zxq is 3, the comma 1
    captions = {"a.png": "zxq, a red circle", "b.png": "a blue square", "d.png": long_caption, "e.png": "",
                "ghost.png": "zxq, an image that is not there", "b.jpg": "zxq, misspelt"}
    folder = _folder(tmp_path, images, captions)
    (folder / "lost.txt").write_text("a caption whose image was deleted", encoding="utf-8")
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ignored"}\n', encoding="utf-8")
    return folder


def test_caption_problems_on_exactly_their_files(caption_folder):
    report = examine(caption_folder, trigger="zxq")
    assert _found(report) == {
        "no_caption": {"c.png", "e.png"},
        "orphan_caption": {"ghost.png", "b.jpg", "lost.txt"},
        "missing_trigger": {"b.png"},
        "caption_too_long": {"d.png"},
        "caption_file": {"metadata.jsonl"},
    }
    by_file = {(f.file, f.problem): f for f in report.findings}
    assert by_file[("b.png", "missing_trigger")].severity == "warning"
    assert "did you mean b.png" in by_file[("b.jpg", "orphan_caption")].detail
    assert "its caption is empty" in by_file[("e.png", "no_caption")].detail
    long = by_file[("d.png", "caption_too_long")]
    assert long.detail.startswith("79 CLIP tokens, 4 over the 75")
    assert long.detail.endswith('stops after "…cat cat cat cat cat cat cat cat red hat" and never sees "on a blue whale"')
    assert report.ok  # caption problems are warnings


def test_missing_trigger_is_a_note_when_training_adds_it(caption_folder):
    report = examine(caption_folder, TrainConfig(trigger_word="zxq"))
    notes = [f for f in report.findings if f.problem == "missing_trigger"]
    assert [(f.file, f.severity) for f in notes] == [("b.png", "info")]
    assert "trigger_word" in notes[0].detail
    assert "zxq" in next(f for f in report.findings if f.file == "c.png").detail  # trained with the trigger alone


def test_no_trigger_no_trigger_check(caption_folder):
    assert "missing_trigger" not in _found(examine(caption_folder))


def test_sidecar_captions_and_a_metadata_file_elsewhere(tmp_path):
    folder = _folder(tmp_path, {"a.png": _scene(1, (512, 512)), "b.png": _scene(2, (512, 512))}, captions={})
    (folder / "a.txt").write_text("a caption", encoding="utf-8")
    assert _found(examine(folder)) == {"no_caption": {"b.png"}}
    elsewhere = tmp_path / "captions.csv"
    elsewhere.write_text("a.png,one\nb.png,two\n", encoding="utf-8")
    report = examine(folder, metadata=elsewhere)
    assert _found(report) == {"caption_file": {"captions.csv"}}  # a.txt is shadowed by the metadata file
    with pytest.raises(DatasetError, match="metadata_path not found"):
        examine(folder, metadata=tmp_path / "missing.csv")


# -- summary --------------------------------------------------------------------------------

def test_steps_and_buckets_are_training_s(clean_folder):
    cfg = TrainConfig(train_data_dir=str(clean_folder), batch_size=2, repeats=3, epochs=4,
                      gradient_accumulation_steps=2)
    report = examine(cfg=cfg)
    records, _ = scan_images(cfg)
    batches = batches_per_epoch(records, cfg)
    assert report.steps == {"per_epoch": -(-batches // 2), "total": 4 * -(-batches // 2)}
    assert examine(cfg=cfg.replace(max_train_steps=7)).steps["total"] == 7
    buckets = make_buckets(cfg)
    expected = Counter("{}x{}".format(*assign_bucket(r.width, r.height, buckets, cfg)) for r in records)
    assert report.buckets == dict(expected)


def test_no_images_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    report = examine(tmp_path / "empty")
    assert [(f.problem, f.severity) for f in report.findings] == [("no_images", "error")]
    assert report.steps == {"per_epoch": 0, "total": 0}


def test_table_rows_and_summary(tmp_path):
    folder = _folder(tmp_path, {"good.png": _scene(1, (512, 512)), "small.png": _scene(2, (200, 200))})
    (folder / "bad.jpg").write_bytes(b"nope" * 10)
    report = examine(folder)
    assert report.findings[0].severity == "error"  # errors first
    assert [len(r) for r in report.table_rows()] == [len(TABLE_COLUMNS)] * len(report.findings)
    assert report.summary().startswith("3 images, 2 usable; 1 error(s), 1 warning(s); 2 steps per epoch, 20 in total")
    assert set(report.counts()) <= set(PROBLEMS)
    assert [f.file for f in report.errors] == ["bad.jpg"]


# -- command line ---------------------------------------------------------------------------

def test_cli_json_contract_and_exit_codes(clean_folder, capsys):
    assert main(["doctor", str(clean_folder), "--json", "--trigger", "zxq"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert list(data) == ["images", "usable", "findings", "buckets", "steps"]
    assert data["findings"] == [] and data["usable"] == 10 and set(data["steps"]) == {"per_epoch", "total"}

    (clean_folder / "broken.png").write_bytes(b"\x89PNG broken")
    assert main(["doctor", str(clean_folder), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert [list(f) for f in data["findings"]][0] == ["file", "problem", "severity", "detail", "fix"]
    assert {(f["file"], f["problem"], f["severity"]) for f in data["findings"]} >= {("broken.png", "unreadable", "error")}


def test_cli_text_report_config_and_errors(clean_folder, tmp_path, capsys):
    config = tmp_path / "my.yaml"
    config.write_text(f"train_data_dir: {clean_folder}\nepochs: 3\ntrigger_word: zxq\n", encoding="utf-8")
    assert main(["doctor", "--config", str(config), "--trigger", "nope"]) == 0  # warnings only
    out = capsys.readouterr().out
    assert "missing_trigger" in out and "10 images, 10 usable; 0 error(s), 10 warning(s)" in out
    assert "10 steps per epoch, 30 in total" in out

    assert main(["doctor", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith(f"error: Image folder not found: {tmp_path / 'nowhere'}")
    assert main(["doctor"]) == 2
