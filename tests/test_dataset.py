"""The dataset stage: image validation, captions on records, buckets, prepared pixels, batches."""

from __future__ import annotations

import io
import math
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFile

from lora_trainer.data import images as images_mod
from lora_trainer.config import TrainConfig
from lora_trainer.data.dataset import (
    apply_trigger,
    assign_bucket,
    batches_per_epoch,
    epoch_batches,
    make_buckets,
    prepare_image,
    process_caption,
    scan_images,
)
from lora_trainer.cli.demo_data import make_demo_images
from lora_trainer.errors import DatasetError
from lora_trainer.data.images import ImageLoadError, load_image


def _noise(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr)


def _save(img, path, **kw):
    img.save(path, **kw)
    return path


def _truncated(path, fmt):
    buf = io.BytesIO()
    _noise(160, 160).save(buf, format=fmt)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def _cfg(folder, **kw):
    return TrainConfig(train_data_dir=str(folder), **kw)


@pytest.fixture
def odd_folder(tmp_path):
    """One of every odd image the scan must handle, beside two ordinary ones."""
    _save(_noise(128, 96), tmp_path / "good.jpg")
    _save(_noise(96, 128), tmp_path / "good2.PNG")
    (tmp_path / "corrupt.jpg").write_bytes(b"this is not an image at all" * 10)
    _truncated(tmp_path / "truncated.jpg", "JPEG")
    _truncated(tmp_path / "truncated.png", "PNG")
    _save(Image.new("CMYK", (100, 100), (0, 255, 255, 0)), tmp_path / "cmyk.jpg")
    _save(Image.fromarray(np.full((100, 100), 40000, dtype=np.uint16)), tmp_path / "sixteen.png")
    pal = Image.new("P", (100, 100), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(1, (50, 0, 100, 100))
    _save(pal, tmp_path / "palette.png", transparency=0)
    rgba = Image.new("RGBA", (100, 100), (0, 0, 255, 0))
    _save(rgba, tmp_path / "rgba.png")
    _save(Image.new("LA", (100, 100), (10, 0)), tmp_path / "la.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    _save(_noise(200, 100), tmp_path / "rotated.jpg", exif=exif)
    _save(_noise(32, 200), tmp_path / "tiny.png")
    (tmp_path / "notes.txt").write_text("not an image, not a sidecar of one")
    (tmp_path / "sub").mkdir()
    _save(_noise(100, 100), tmp_path / "sub" / "nested.png")
    (tmp_path / "metadata.csv").write_text("good.jpg,a lab, neon\nrotated.jpg,rotated, sks style\n")
    return tmp_path


def test_scan_reports_used_fixed_skipped(odd_folder):
    records, report = scan_images(_cfg(odd_folder, trigger_word="sks"))
    by_name = {r.name: r for r in records}
    assert sorted(by_name) == sorted(report.used) == sorted(
        ["good.jpg", "good2.PNG", "cmyk.jpg", "sixteen.png", "palette.png", "rgba.png", "la.png", "rotated.jpg"])
    skipped = dict(report.skipped)
    assert set(skipped) == {"corrupt.jpg", "truncated.jpg", "truncated.png", "tiny.png"}
    assert "not a readable" in skipped["corrupt.jpg"]
    assert "truncated" in skipped["truncated.jpg"]
    assert "too small" in skipped["tiny.png"]
    fixed = dict(report.fixed)
    assert "CMYK" in fixed["cmyk.jpg"]
    assert "16-bit" in fixed["sixteen.png"]
    assert "white" in fixed["palette.png"] and "white" in fixed["rgba.png"] and "white" in fixed["la.png"]
    assert "EXIF orientation 6" in fixed["rotated.jpg"]
    assert "good.jpg" not in fixed and "good2.PNG" not in fixed
    # EXIF orientation 6 turns a 200x100 file into a 100x200 image
    assert (by_name["rotated.jpg"].width, by_name["rotated.jpg"].height) == (100, 200)
    assert (by_name["good.jpg"].width, by_name["good.jpg"].height) == (128, 96)
    # the trigger word goes first unless the caption has it
    assert by_name["good.jpg"].caption == "sks, a lab, neon"
    assert by_name["rotated.jpg"].caption == "rotated, sks style"
    assert by_name["cmyk.jpg"].caption == "sks"
    assert any("cmyk.jpg has no caption" in w for w in report.warnings)
    # one line per problem, plus the counts
    summary = report.summary()
    assert summary.splitlines()[0].startswith("8 used")
    assert len(summary.splitlines()) == 1 + len(report.skipped) + len(report.fixed) + len(report.warnings)
    assert "nested.png" not in summary


def test_records_are_sorted_and_hashed(odd_folder):
    import hashlib

    records, _ = scan_images(_cfg(odd_folder))
    assert [r.name for r in records] == sorted(r.name for r in records)
    good = next(r for r in records if r.name == "good.jpg")
    assert good.content_hash == hashlib.sha1((odd_folder / "good.jpg").read_bytes()).hexdigest()
    assert good.path == odd_folder / "good.jpg"


def test_converted_pixels_are_sensible(odd_folder):
    def pixel(name, xy=(75, 50)):
        img = load_image(odd_folder / name).image
        assert img.mode == "RGB"
        return img.getpixel(xy)

    assert pixel("sixteen.png") == (156, 156, 156)  # 40000 / 257, not clipped to white
    assert pixel("rgba.png") == (255, 255, 255)  # fully transparent on white
    assert pixel("palette.png", (10, 10)) == (255, 255, 255)  # the transparent index
    assert pixel("palette.png", (75, 10)) == (255, 0, 0)
    assert pixel("cmyk.jpg")[0] > 200 and pixel("cmyk.jpg")[1] < 60  # CMYK (0, 255, 255, 0) is red


def test_truncated_files_fail_even_if_a_host_allows_them(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(_truncated(tmp_path / "t.jpg", "JPEG"))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


@pytest.mark.parametrize("side", [150, 120])  # over 2x the limit (Pillow raises) and between 1x and 2x (warns)
def test_decompression_bomb_is_skipped(tmp_path, monkeypatch, side):
    _save(_noise(100, 100), tmp_path / "ok.png")
    _save(_noise(side, side), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    records, report = scan_images(_cfg(tmp_path))
    assert [r.name for r in records] == ["ok.png"]
    (name, why), = report.skipped
    assert name == "bomb.png" and "too large" in why and "10,000" in why


def test_bomb_guard_when_host_disabled_pillows_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    monkeypatch.setattr(images_mod, "DEFAULT_MAX_PIXELS", 5_000)
    with pytest.raises(ImageLoadError, match="too large: 100x100"):
        load_image(_save(_noise(100, 100), tmp_path / "big.png"))


def test_missing_empty_and_broken_folders(tmp_path):
    with pytest.raises(DatasetError, match="train_data_dir not found"):
        scan_images(_cfg(tmp_path / "nope"))
    with pytest.raises(DatasetError, match="No images in"):
        scan_images(_cfg(tmp_path))
    (tmp_path / "a.jpg").write_bytes(b"garbage")
    _truncated(tmp_path / "b.png", "PNG")
    with pytest.raises(DatasetError, match="No usable image") as err:
        scan_images(_cfg(tmp_path))
    assert "a.jpg: " in str(err.value) and "b.png: " in str(err.value) and "truncated" in str(err.value)


def test_kohya_style_subfolder_gets_a_hint(tmp_path):
    (tmp_path / "10_style").mkdir()
    _save(_noise(100, 100), tmp_path / "10_style" / "a.png")
    with pytest.raises(DatasetError, match="10_style.*repeats"):
        scan_images(_cfg(tmp_path))


def test_metadata_problems_and_unknown_names_become_warnings(tmp_path):
    _save(_noise(100, 100), tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_text("a.png,one\nlonely\nghost.png,two\n")
    _, report = scan_images(_cfg(tmp_path))
    assert any("line 2" in w for w in report.warnings)
    assert any("ghost.png" in w and "not in the folder" in w for w in report.warnings)


def test_apply_trigger():
    assert apply_trigger("a cat", "sks") == "sks, a cat"
    assert apply_trigger("", "sks") == "sks"
    assert apply_trigger("photo of SKS cat", "sks") == "photo of SKS cat"
    assert apply_trigger("sksx cat", "sks") == "sks, sksx cat"  # whole words only
    assert apply_trigger("a cat", "") == "a cat"


def test_process_caption_shuffle_keep_tokens_and_dropout():
    caption = "sks, a, b, c, d, e, f"
    cfg = TrainConfig(shuffle_caption=True, keep_tokens=1)
    outs = {process_caption(caption, cfg, random.Random(i)) for i in range(20)}
    assert len(outs) > 1 and all(o.startswith("sks, ") for o in outs)
    assert all(sorted(o.split(", ")) == sorted(caption.split(", ")) for o in outs)
    assert process_caption(caption, cfg, random.Random(3)) == process_caption(caption, cfg, random.Random(3))
    assert process_caption(caption, TrainConfig(), random.Random(0)) == caption
    dropout = TrainConfig(caption_dropout_rate=0.5)
    dropped = [process_caption(caption, dropout, random.Random(i)) for i in range(400)]
    assert 120 < dropped.count("") < 280 and set(dropped) == {"", caption}


def test_buckets_are_multiples_within_bounds_and_area():
    cfg = TrainConfig()  # 512, 256..1024, step 64
    buckets = make_buckets(cfg)
    assert (512, 512) in buckets and (1024, 256) in buckets and (256, 1024) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert 256 <= w <= 1024 and 256 <= h <= 1024
        assert w * h <= 512 * 512
    assert len(set(buckets)) == len(buckets)
    odd = TrainConfig(resolution=768, min_bucket_reso=320, max_bucket_reso=1536, bucket_reso_steps=32)
    for w, h in make_buckets(odd):
        assert w % 32 == 0 and h % 32 == 0 and 320 <= min(w, h) and max(w, h) <= 1536 and w * h <= 768 * 768


@pytest.mark.parametrize("size", [(1000, 1000), (1920, 1080), (1080, 1920), (3000, 700), (640, 480), (480, 640)])
def test_assign_bucket_picks_the_nearest_aspect_ratio(size):
    cfg = TrainConfig()
    buckets = make_buckets(cfg)
    w, h = assign_bucket(*size, buckets, cfg)
    err = abs(math.log((w / h) / (size[0] / size[1])))
    assert all(err <= abs(math.log((bw / bh) / (size[0] / size[1]))) + 1e-12 for bw, bh in buckets)
    assert (w > h) == (size[0] > size[1]) or size[0] == size[1]


def test_bucket_no_upscale_and_no_bucketing():
    cfg = TrainConfig(bucket_no_upscale=True)
    buckets = make_buckets(cfg)
    assert assign_bucket(300, 200, buckets, cfg) == (256, 192)  # fits inside, rounded down to 64
    assert assign_bucket(100, 100, buckets, cfg) == (64, 64)
    w, h = assign_bucket(2000, 1500, buckets, cfg)  # large images still use the regular buckets
    assert (w, h) in buckets and w <= 2000 and h <= 1500
    for size in [(600, 400), (1000, 200), (700, 700), (65, 900)]:
        w, h = assign_bucket(*size, buckets, cfg)
        assert w <= size[0] and h <= size[1] and w % 64 == 0 and h % 64 == 0, size
    flat = TrainConfig(enable_bucket=False, resolution=256)
    assert assign_bucket(1920, 1080, make_buckets(flat), flat) == (256, 256)


def _record(folder, img, name="x.png"):
    img.save(folder / name)
    cfg = _cfg(folder, min_bucket_reso=64)
    (record,) = [r for r in scan_images(cfg)[0] if r.name == name]
    return record


def test_prepare_image_centre_crop_and_sizes(tmp_path):
    arr = np.zeros((100, 200, 3), dtype=np.uint8)
    arr[:, :100] = 255  # left half white, right half black
    record = _record(tmp_path, Image.fromarray(arr))
    p = prepare_image(record, (64, 64), flip=False)
    assert tuple(p.pixels.shape) == (3, 64, 64)
    assert p.pixels.dtype.is_floating_point and -1.0 <= float(p.pixels.min()) and float(p.pixels.max()) <= 1.0
    assert p.original_size == (100, 200) and p.target_size == (64, 64)
    assert p.crop_top_left == (0, 32)  # resized to 128x64, centre column crop
    assert float(p.pixels[:, :, :20].mean()) > 0.9 and float(p.pixels[:, :, -20:].mean()) < -0.9
    flipped = prepare_image(record, (64, 64), flip=True)
    assert flipped.pixels.flip(-1).allclose(p.pixels)
    assert flipped.crop_top_left == (0, 32)


def test_prepare_image_random_crop_is_seeded(tmp_path):
    record = _record(tmp_path, _noise(300, 100))
    a = prepare_image(record, (64, 64), flip=False, crop_rng=random.Random(7))
    b = prepare_image(record, (64, 64), flip=False, crop_rng=random.Random(7))
    assert a.crop_top_left == b.crop_top_left and a.pixels.equal(b.pixels)
    lefts = {prepare_image(record, (64, 64), False, random.Random(s)).crop_top_left[1] for s in range(10)}
    assert len(lefts) > 1 and all(0 <= left <= 192 - 64 for left in lefts)
    # a flipped crop reports where it sits in the mirrored image
    f = prepare_image(record, (64, 64), flip=True, crop_rng=random.Random(7))
    assert f.crop_top_left == (0, 192 - 64 - a.crop_top_left[1])
    assert f.pixels.flip(-1).equal(a.pixels)


def test_prepare_image_portrait_bucket_from_exif_image(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    _noise(256, 128).save(tmp_path / "r.jpg", exif=exif)
    record = next(r for r in scan_images(_cfg(tmp_path, min_bucket_reso=64))[0] if r.name == "r.jpg")
    p = prepare_image(record, (64, 128), flip=False)
    assert tuple(p.pixels.shape) == (3, 128, 64) and p.original_size == (256, 128) and p.crop_top_left == (0, 0)


def _records(tmp_path, sizes):
    for i, (w, h) in enumerate(sizes):
        _noise(w, h, seed=i).save(tmp_path / f"img{i:02d}.png")
    return scan_images(_cfg(tmp_path, min_bucket_reso=64))[0]


def test_epoch_batches_are_deterministic_grouped_and_counted(tmp_path):
    sizes = [(128, 128)] * 5 + [(192, 96)] * 4 + [(96, 192)] * 2
    records = _records(tmp_path, sizes)
    cfg = _cfg(tmp_path, min_bucket_reso=64, resolution=128, repeats=3, batch_size=2)
    batches = epoch_batches(records, cfg, epoch=1, seed=42)
    assert batches == epoch_batches(records, cfg, epoch=1, seed=42)
    assert batches == epoch_batches(list(reversed(records)), cfg, epoch=1, seed=42)  # input order does not matter
    assert batches != epoch_batches(records, cfg, epoch=2, seed=42)
    assert batches != epoch_batches(records, cfg, epoch=1, seed=43)
    counts = Counter(r.name for batch in batches for r, _ in batch)
    assert set(counts.values()) == {3} and len(counts) == 11
    assert all(1 <= len(b) <= 2 for b in batches)
    assert all(len({bucket for _, bucket in b}) == 1 for b in batches)
    per_bucket = Counter(bucket for b in batches for _, bucket in b)
    assert sorted(per_bucket.values()) == [6, 12, 15]
    partial = [b for b in batches if len(b) < 2]
    assert len(partial) == 1  # only the 15-image bucket has an odd count: its last partial batch is kept
    assert len(batches) == batches_per_epoch(records, cfg) == 3 + 6 + 8


def test_demo_images_scan_cleanly(tmp_path):
    folder = make_demo_images(tmp_path / "demo", n=6, size=96)
    records, report = scan_images(_cfg(folder, trigger_word="flatshapes", min_bucket_reso=64, resolution=128))
    assert len(records) == 6 and not report.skipped and not report.fixed and not report.warnings
    assert records[0].caption.startswith("flatshapes, a ") and records[0].caption.endswith(", flat style")
    first = (folder / "metadata.csv").read_text().splitlines()[0]
    assert first.startswith("img001.png,a ") and first.endswith("background, flat style")
    again = make_demo_images(tmp_path / "again", n=6, size=96)
    assert (again / "img003.png").read_bytes() == (folder / "img003.png").read_bytes()
