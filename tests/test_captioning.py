"""Captioning a folder with open_clip CoCa: a tiny random CoCa built from a config, no download.

The tiny model writes gibberish sentences, so these tests check the path (folder -> captions file,
kept captions, backups, unreadable images, missing weights, callbacks) and the shape of captions;
tag ranking is checked with embeddings built so that the right tags must win.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from lora_trainer.callbacks import Callbacks
from lora_trainer.data.captions import (
    CaptionOptions,
    Captioner,
    Tag,
    Tagger,
    caption_folder,
    caption_image,
    compose_caption,
    load_vocabulary,
    rank_tags,
    read_captions,
    remove_vague_words,
    run_captioning,
)
from lora_trainer.data.captions import coca as coca_module
from lora_trainer.data.captions.coca import TINY_COCA
from lora_trainer.data.captions.shape import clip_token_count
from lora_trainer.data.captions.weights import find_weights
from lora_trainer.cli.commands import main
from lora_trainer.cli.demo_data import make_demo_images
from lora_trainer.errors import CaptionError, LoraTrainerError

B32_REPO = "laion/mscoco_finetuned_CoCa-ViT-B-32-laion2B-s13B-b90k"


@pytest.fixture
def options(tiny_coca, tmp_path):
    config, weights, _ = tiny_coca
    return CaptionOptions(model=str(config), pretrained=str(weights), trigger="jiangnan_style", batch_size=3,
                          num_beams=2, max_tokens=8, tag_threshold=0.0, weights_dir=str(tmp_path / "weights"),
                          hf_cache_dir=str(tmp_path / "hf"), tag_cache_dir=str(config.parent / "tags"))


@pytest.fixture
def folder(tmp_path):
    """Five 64 px images, no captions, and one file that is not an image."""
    data = make_demo_images(tmp_path / "data", n=5, size=64)
    (data / "metadata.csv").unlink()
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return data


class Recorder(Callbacks):
    def __init__(self, stop_after: int | None = None) -> None:
        self.progress, self.status, self.stop_after = [], [], stop_after

    def on_progress(self, step: int, total: int) -> None:
        self.progress.append((step, total))

    def on_status(self, message: str) -> None:
        self.status.append(message)

    def should_stop(self) -> bool:
        return self.stop_after is not None and bool(self.progress) and self.progress[-1][0] >= self.stop_after


# -- the whole path ------------------------------------------------------------------------------

def test_folder_to_metadata_csv_end_to_end(folder, options, monkeypatch):
    released = []
    real_release = coca_module.release
    monkeypatch.setattr(coca_module, "release", lambda m: (released.append(m), real_release(m)))
    calls = Recorder()
    report = run_captioning(folder, options=options, callbacks=calls)

    captions = read_captions(folder)
    assert sorted(captions.captions) == [f"img{i:03d}.png" for i in range(1, 6)]
    assert all(c.startswith("jiangnan_style, ") for c in captions.captions.values())
    assert report.count("new") == 5 and report.output == folder / "metadata.csv"
    assert [(r.name, r.status) for r in report.failed] == [("broken.png", "failed")]
    assert "not a readable" in report.failed[0].error and "broken.png" in report.summary()
    assert any("skipped broken.png" in s for s in calls.status)
    assert calls.progress[0] == (0, 6) and calls.progress[-1] == (6, 6)
    assert len(released) == 1 and released[0] is not None and released[0].model is None  # VRAM handed back
    assert list(Path(options.tag_cache_dir).glob("coca_tiny_test-*.safetensors"))  # tag embeddings cached


@pytest.mark.parametrize("fmt", ["txt", "jsonl"])
def test_txt_sidecars_and_jsonl(folder, options, fmt):
    report = run_captioning(folder, fmt=fmt, options=options)
    assert report.count("new") == 5
    if fmt == "txt":
        assert (folder / "img001.txt").read_text(encoding="utf-8").startswith("jiangnan_style, ")
        assert not (folder / "metadata.csv").exists()
    else:
        rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
        assert [r["file_name"] for r in rows] == [f"img{i:03d}.png" for i in range(1, 6)]
    assert len(read_captions(folder)) == 5


def test_cli_caption_prints_a_summary(folder, tiny_coca, tmp_path, capsys):
    config, _, weights_bin = tiny_coca  # the .bin (pickle) path, read with weights_only=True
    out = tmp_path / "captions.csv"
    code = main(["caption", "--input", str(folder), "--output", str(out), "--trigger", "ink_town",
                 "--model", str(config), "--pretrained", str(weights_bin), "--beams", "1", "--batch-size", "4"])
    assert code == 0
    assert "5 captioned, 0 kept, 1 unreadable" in capsys.readouterr().out
    assert all(c.startswith("ink_town") for c in read_captions(folder, metadata_path=out).captions.values())


# -- no caption a person wrote is lost ---------------------------------------------------------

def test_existing_captions_are_kept(folder, options):
    (folder / "metadata.csv").write_text("img001.png,my own words, edited by hand\nimg002.png,\n", encoding="utf-8")
    (folder / "img003.txt").write_text("a sidecar caption", encoding="utf-8")
    results = {r.name: r for r in caption_folder(folder, options=options)}

    assert results["img001.png"].status == "kept" and results["img003.png"].status == "kept"
    assert results["img002.png"].status == "new"  # an empty caption counts as none
    captions = read_captions(folder)
    assert captions["img001.png"] == "my own words, edited by hand"
    assert captions["img003.png"] == "a sidecar caption"  # still from its sidecar, untouched
    assert "img003.png" not in (folder / "metadata.csv").read_text(encoding="utf-8")


def test_nothing_to_do_loads_no_model(folder, options):
    (folder / "broken.png").unlink()
    (folder / "metadata.csv").write_text("".join(f"img{i:03d}.png,done\n" for i in range(1, 6)), encoding="utf-8")
    options.pretrained = str(folder / "missing.safetensors")  # would fail if the model were loaded
    assert {r.status for r in caption_folder(folder, options=options)} == {"kept"}


def test_overwrite_keeps_a_backup_of_every_earlier_file(folder, options):
    (folder / "metadata.csv").write_text("img001.png,hand edit one\n", encoding="utf-8")
    first = run_captioning(folder, options=options, overwrite=True)
    assert first.backup == folder / "metadata.csv.bak"
    assert first.backup.read_text(encoding="utf-8") == "img001.png,hand edit one\n"
    assert read_captions(folder)["img001.png"].startswith("jiangnan_style")

    second = run_captioning(folder, options=options, overwrite=True)
    assert second.backup == folder / "metadata.csv-v2.bak"  # the first backup is never replaced
    assert (folder / "metadata.csv.bak").read_text(encoding="utf-8") == "img001.png,hand edit one\n"


def test_overwrite_of_txt_sidecars_saves_them_first(folder, options):
    (folder / "img002.txt").write_text("hand written, with a comma", encoding="utf-8")
    report = run_captioning(folder, fmt="txt", options=options, overwrite=True)
    assert report.backup == folder / "captions.bak.csv"
    assert read_captions(folder, metadata_path=report.backup)["img002.png"] == "hand written, with a comma"


def test_stop_keeps_what_was_written(folder, options):
    report = run_captioning(folder, options=options, callbacks=Recorder(stop_after=3))
    assert report.stopped and report.count("new") + len(report.failed) == 3
    assert len(read_captions(folder)) == report.count("new")


# -- weights -----------------------------------------------------------------------------------

def test_missing_weights_offline_give_one_clear_message(folder, tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    options = CaptionOptions(model="coca_ViT-B-32", weights_dir=str(tmp_path / "weights"))
    with pytest.raises(CaptionError) as err:
        list(caption_folder(folder, options=options))
    message = str(err.value)
    assert isinstance(err.value, LoraTrainerError) and "\n" not in message
    assert f"https://huggingface.co/{B32_REPO}/resolve/main/open_clip_pytorch_model.bin" in message
    assert str(tmp_path / "weights" / "coca_ViT-B-32" / "mscoco_finetuned_laion2b_s13b_b90k") in message
    assert "--pretrained PATH" in message

    def offline(*args, **kwargs):
        raise OSError("We have no connection or you passed local_files_only")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    code = main(["caption", "--input", str(folder), "--model", "coca_ViT-B-32", "--download"])
    err_text = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err_text) == 1
    assert err_text[0].startswith("error: Captioner weights for coca_ViT-B-32") and "download failed" in err_text[0]
    assert not (folder / "metadata.csv").exists()


def test_weights_are_found_in_the_weights_folder_and_the_hf_cache(tmp_path):
    own = tmp_path / "weights" / "coca_ViT-B-32" / "mscoco_finetuned_laion2b_s13b_b90k"
    own.mkdir(parents=True)
    (own / "open_clip_pytorch_model.bin").write_bytes(b"x")
    found = find_weights("coca_ViT-B-32", "mscoco_finetuned_laion2B-s13B-b90k", tmp_path / "weights",
                         tmp_path / "hf")
    assert found.path == own / "open_clip_pytorch_model.bin"
    assert found.key == "coca_ViT-B-32/mscoco_finetuned_laion2b_s13b_b90k"

    repo = tmp_path / "hf" / f"models--{B32_REPO.replace('/', '--')}"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123", encoding="utf-8")
    (repo / "snapshots" / "abc123" / "open_clip_model.safetensors").write_bytes(b"x")
    found = find_weights("coca_ViT-B-32", "mscoco_finetuned_laion2b_s13b_b90k", tmp_path / "empty", tmp_path / "hf")
    assert found.path == repo / "snapshots" / "abc123" / "open_clip_model.safetensors"


def test_weights_of_another_model_are_refused(tiny_coca, tmp_path):
    config, weights, _ = tiny_coca
    other = dict(TINY_COCA, embed_dim=16)
    other_config = tmp_path / "coca_tiny_other.json"
    other_config.write_text(json.dumps(other), encoding="utf-8")
    with pytest.raises(CaptionError, match="does not fit the coca_tiny_other model"):
        coca_module.load_coca(str(other_config), str(weights))
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(CaptionError, match="Cannot read the captioner weights"):
        coca_module.load_coca(str(config), str(tmp_path / "junk.bin"))


# -- tags ----------------------------------------------------------------------------------------

def _stand_in_tagger(tmp_path, encode_text):
    vocab = tmp_path / "vocab"
    vocab.mkdir(exist_ok=True)
    (vocab / "colour.txt").write_text("red\ngreen\nblue\n", encoding="utf-8")
    (vocab / "lighting.txt").write_text("soft light\nneon glow\n", encoding="utf-8")
    (vocab / "subject.txt").write_text("# animals and things\ncat\nboat\nhouse\nboat\n", encoding="utf-8")
    return Tagger(load_vocabulary(vocab), encode_text, logit_scale=100.0, cache_key="stand-in/v1",
                  cache_dir=tmp_path / "cache")


def test_ranking_picks_the_tags_the_embeddings_point_at(tmp_path):
    """Phrase i embeds as basis vector i; an image close to blue, neon glow, boat and house must get those."""
    encoded = []

    def encode_text(phrases):  # the stand-in model's text tower
        encoded.extend(phrases)
        table = {p: i for i, p in enumerate(["blue", "green", "red", "neon glow", "soft light", "boat", "cat",
                                              "house"])}
        return torch.eye(8)[[table[p] for p in phrases]] * 3.0  # not normalized: the tagger must normalize

    tagger = _stand_in_tagger(tmp_path, encode_text)
    assert tagger.vocabulary.of("subject") == ["cat", "boat", "house"]  # comment and duplicate dropped
    image = torch.zeros(2, 8)
    image[0, [0, 3, 5, 7]] = torch.tensor([0.5, 0.5, 0.5, 0.495])  # blue, neon glow, boat, house a little less
    image[1, [1, 2]] = 0.5  # green and red tie: neither is clearly the colour of this image
    ranked = tagger.rank(image, threshold=0.3)
    assert [(t.category, t.phrase) for t in ranked[0]][2:] == [("subject", "boat"), ("subject", "house")]
    assert {t.phrase for t in ranked[0][:2]} == {"blue", "neon glow"} and ranked[0][1].score > 0.99
    assert 0.5 < ranked[0][2].score < 0.7 and 0.3 < ranked[0][3].score < 0.5  # boat wins, house is second
    assert tagger.rank(image, threshold=0.6)[1] == []  # a tie (0.5 each) is no winner
    top1 = rank_tags(image, tagger.text_features(), tagger.vocabulary, 100.0, 0.3, top_k=1)[0]
    assert {t.phrase for t in top1} == {"blue", "neon glow", "boat"}

    cached = _stand_in_tagger(tmp_path, lambda phrases: pytest.fail("should come from the disk cache"))
    assert torch.equal(cached.text_features(), tagger.text_features())
    assert len(encoded) == 8


# -- the shape of a caption --------------------------------------------------------------------

def test_trigger_first_vague_words_out_tags_by_slot():
    tags = [Tag("ink wash painting", "medium", 0.9), Tag("morning mist", "weather", 0.8),
            Tag("soft light", "lighting", 0.7), Tag("boat", "subject", 0.95), Tag("stone bridge", "subject", 0.6)]
    shaped = compose_caption("a beautiful view of a Jiangnan_Style canal with a stone bridge.", tags,
                             trigger="jiangnan_style")
    assert shaped.text == ("jiangnan_style, a view of a canal with a stone bridge, boat, morning mist, soft light, "
                           "ink wash painting")
    assert shaped.warnings == []
    assert remove_vague_words("masterpiece, nice view, a stunning and quiet lake") == "a quiet lake"
    assert remove_vague_words("an amazing old house") == "an old house"
    assert remove_vague_words("a gorgeous house") == "a house"


def test_long_captions_lose_weak_tags_then_warn():
    long_tags = [Tag(f"phrase number {i} with several words", "style", 1.0 - i / 100) for i in range(20)]
    shaped = compose_caption("a boat on a canal", long_tags, trigger="jiangnan_style")
    assert clip_token_count(shaped.text) <= 75 and shaped.warnings == []
    assert shaped.dropped_tags and shaped.dropped_tags[0] == "phrase number 19 with several words"
    too_long = compose_caption(" ".join(["lantern"] * 80))
    assert too_long.warnings and "80 CLIP tokens" in too_long.warnings[0]


def test_kept_caption_over_75_tokens_is_flagged(folder, options):
    (folder / "broken.png").unlink()
    (folder / "metadata.csv").write_text(
        "img001.png," + " ".join(["pagoda"] * 90) + "\n" + "".join(f"img{i:03d}.png,ok\n" for i in range(2, 6)),
        encoding="utf-8")
    results = {r.name: r for r in caption_folder(folder, options=options)}
    assert "over the 75" in results["img001.png"].warnings[0] and results["img002.png"].warnings == []


# -- the API the UIs call ----------------------------------------------------------------------

def test_captioner_and_caption_image(options, folder):
    image = Image.open(folder / "img001.png").convert("RGB")
    one = caption_image(image, options)
    assert one.text.startswith("jiangnan_style, ") and one.sentence
    assert all(t.phrase in one.text for t in one.tags)
    with Captioner(options) as captioner:
        batch = captioner.caption([image, image.rotate(90), image])
    assert len(batch) == 3 and batch[0].text == batch[2].text  # deterministic
    with pytest.raises(CaptionError, match="closed"):
        captioner.caption([image])
    with pytest.raises(CaptionError, match="broken.png"):
        caption_image(folder / "broken.png", options)


def test_bad_options_are_one_line_errors(folder, tmp_path, capsys):
    assert main(["caption", "--input", str(folder), "--batch-size", "0"]) == 2
    assert main(["caption", "--input", str(folder), "--format", "txt", "--output", str(tmp_path / "x.csv")]) == 2
    assert main(["caption", "--input", str(tmp_path / "nowhere")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["error"] * 3
    assert "batch_size" in lines[0] and "does not match" in lines[1] and "not found" in lines[2]
