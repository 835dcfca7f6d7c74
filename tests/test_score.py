"""Strength scoring: a tiny random CoCa scores tiny SD1 renders of a random LoRA, no download.

The tiny models say nothing about style, so these tests check the path (render → score → best),
that the numbers are finite and the same on every run, the JSON shape, missing weights, the trigger
word, and the best-strength rule on hand-made scores.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from lora_trainer.data.captions.shape import put_trigger_first, remove_trigger
from lora_trainer.data.captions.weights import MissingWeights
from lora_trainer.cli.commands import main
from lora_trainer.errors import DatasetError
from lora_trainer.evaluate.score import (
    FIDELITY_MARGIN,
    StrengthScore,
    StrengthScorer,
    combined_score,
    lora_trigger,
    pick_best,
    rank_strengths,
    read_trigger,
    with_base,
)

PROMPTS = ["ink_town, a stone bridge over a canal", "a lantern at night in ink_town style"]
STRENGTHS = [0.5, 0.6, 0.7, 0.8]


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    """A kohya-layout LoRA of random weights on the tiny SD1 UNet, with a trigger phrase in its metadata."""
    from lora_trainer.adapters.export import lora_state_dict, save_lora
    from lora_trainer.adapters.lora import UNET_TARGETS, add_lora, lora_layers, resolve_targets
    from lora_trainer.model import build_tiny_components

    components = build_tiny_components("sd1", seed=0)
    add_lora(components.unet, resolve_targets(components.unet, ["attn"], UNET_TARGETS), rank=4, alpha=4)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # peft starts B at zero: no effect at any strength
        for layer in lora_layers(components.unet).values():
            up = layer.lora_B["default"].weight
            up.copy_(torch.randn(up.shape, generator=generator) * 0.5)
    path = tmp_path_factory.mktemp("lora") / "ink.safetensors"
    return save_lora(path, lora_state_dict(components, torch.float32), {"modelspec.trigger_phrase": "ink_town"})


@pytest.fixture
def references(tmp_path):
    from lora_trainer.cli.demo_data import make_demo_images

    folder = make_demo_images(tmp_path / "refs", n=4, size=64)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return folder


def _render(base_file, lora_path, strengths):
    from lora_trainer.adapters.export import load_lora_file
    from lora_trainer.model import load_components
    from lora_trainer.evaluate.sample import render_images

    components = load_components(base_file)
    load_lora_file(components, lora_path)
    return render_images(components, PROMPTS, strengths, seed=1, steps=2, device="cpu")


def test_scores_are_finite_repeatable_and_the_best_is_asked(tiny_sd1_file, lora_file, tiny_coca, references):
    config, weights, _ = tiny_coca
    rendered = with_base(STRENGTHS)
    assert rendered == [0.0, *STRENGTHS]
    reports = []
    for _ in range(2):  # everything again: render, load, score
        rows = _render(tiny_sd1_file, lora_file, rendered)
        with StrengthScorer(references, str(config), str(weights), device="cpu") as scorer:
            scores = scorer.score_images(rows, rendered, PROMPTS, trigger="ink_town")
            assert scorer.reference_count == 4 and [s.split(":")[0] for s in scorer.skipped] == ["broken.png"]
        assert scorer.coca is None  # released
        reports.append(rank_strengths(scores, STRENGTHS))
    first, second = reports
    assert first == second  # exactly the same numbers
    assert [s.strength for s in first.scores] == STRENGTHS and first.base.strength == 0.0
    for s in [first.base, *first.scores]:
        assert all(math.isfinite(v) for v in (s.style, s.fidelity, s.combined))
        assert -1.0 <= s.style <= 1.0 and -1.0 <= s.fidelity <= 1.0
        assert s.combined == pytest.approx(combined_score(s.style, s.fidelity))
    assert first.best in STRENGTHS
    assert len({s.style for s in first.scores}) > 1  # the LoRA changes the pictures, so the scores move


def test_fidelity_is_measured_without_the_trigger(tiny_sd1_file, lora_file, tiny_coca, references):
    config, weights, _ = tiny_coca
    rows = _render(tiny_sd1_file, lora_file, [0.0, 0.5])
    with StrengthScorer(references, str(config), str(weights), device="cpu") as scorer:
        with_trigger = scorer.score_images(rows, [0.0, 0.5], PROMPTS, trigger="ink_town")
        without = scorer.score_images(rows, [0.0, 0.5], [remove_trigger(p, "ink_town") for p in PROMPTS])
        kept = scorer.score_images(rows, [0.0, 0.5], PROMPTS)
    assert with_trigger == without
    assert [s.fidelity for s in kept] != [s.fidelity for s in without]
    assert [s.style for s in kept] == [s.style for s in without]  # style never reads the prompt


@pytest.mark.once  # the same on every stack: the newest runs it
def test_cli_prints_the_json_shape_and_writes_the_grid(tiny_sd1_file, lora_file, tiny_coca, references, tmp_path,
                                                       capsys):
    config, weights, _ = tiny_coca
    grid = tmp_path / "grid.png"
    argv = ["score", "--base-model", str(tiny_sd1_file), "--lora", str(lora_file), "--prompt", PROMPTS[0],
            "--prompt", PROMPTS[1], "--reference-dir", str(references), "--strengths", "0.5,0.6,0.7,0.8",
            "--clip-model", str(config), "--clip-weights", str(weights), "--steps", "2", "--seed", "3", "--json"]
    outputs = []
    for extra in (["--output", str(grid)], []):
        assert main(argv + extra) == 0
        captured = capsys.readouterr()
        outputs.append(captured.out)
        assert "skipped reference broken.png" in captured.err
    assert outputs[0] == outputs[1]  # same inputs, same numbers
    result = json.loads(outputs[0])
    assert set(result) == {"scores", "best"}
    assert [set(s) for s in result["scores"]] == [{"strength", "style", "fidelity", "combined"}] * 4
    assert [s["strength"] for s in result["scores"]] == STRENGTHS and result["best"] in STRENGTHS
    from PIL import Image

    assert Image.open(grid).width == 5 * 64  # the base column and the four asked

    assert main(argv[:-1]) == 0  # the table
    table = capsys.readouterr().out
    assert "trigger 'ink_town' taken out" in table and "best" in table and "base" in table


def test_missing_weights_say_what_to_get(tmp_path, references, monkeypatch, capsys, tiny_sd1_file):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    with pytest.raises(MissingWeights) as err:
        StrengthScorer(references, "coca_ViT-B-32", weights_dir=str(tmp_path / "weights"))
    assert "open_clip_pytorch_model.bin" in str(err.value) and "\n" not in str(err.value)

    lora = tmp_path / "x.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 2), "lora_unet_x.lora_up.weight": torch.zeros(2, 1)},
              str(lora))
    code = main(["score", "--base-model", str(tiny_sd1_file), "--lora", str(lora),
                 "--prompt", "p", "--reference-dir", str(references), "--clip-model", "coca_ViT-B-32"])
    err_text = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err_text) == 1  # after the user's files were found, before anything is rendered
    assert err_text[0].startswith("error: Captioner weights for coca_ViT-B-32")
    assert "--clip-weights PATH" in err_text[0] and "--download" not in err_text[0]


def test_a_reference_folder_without_images_is_refused_before_loading(tmp_path, tiny_coca):
    config, weights, _ = tiny_coca
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="No images in"):
        StrengthScorer(tmp_path / "empty", str(config), str(weights))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="None of the images"):
        StrengthScorer(tmp_path / "bad", str(config), str(weights))


# -- the trigger word ----------------------------------------------------------------------------

def test_trigger_is_removed_as_a_whole_word():
    assert remove_trigger("ink_town, a bridge", "ink_town") == "a bridge"
    assert remove_trigger("a lantern in Ink_Town style, night", "ink_town") == "a lantern in style, night"
    assert remove_trigger("ink_towns, ink_town-like", "ink_town") == "ink_towns, ink_town-like"
    assert remove_trigger("a bridge", "") == "a bridge"
    assert put_trigger_first("a bridge, ink_town", "ink_town") == "ink_town, a bridge"
    assert put_trigger_first("ink_town", "ink_town") == "ink_town"


def test_trigger_is_read_from_the_lora_metadata(lora_file):
    assert read_trigger(lora_file) == "ink_town"
    ours = {"lora_trainer.config": json.dumps({"trigger_word": "jiangnan_style"}),
            "modelspec.trigger_phrase": "other"}
    assert lora_trigger(ours) == "jiangnan_style"
    assert lora_trigger({"modelspec.trigger_phrase": " sks "}) == "sks"
    kohya = {"ss_dataset_dirs": json.dumps({"10_x": {"n_repeats": 10, "img_count": 3}}),
             "ss_tag_frequency": json.dumps({"10_x": {"sks": 3, "1girl": 2, "smile": 1}})}
    assert lora_trigger(kohya) == "sks"  # the one tag every caption holds
    kohya["ss_tag_frequency"] = json.dumps({"10_x": {"sks": 3, "1girl": 3}})
    assert lora_trigger(kohya) == ""  # two such tags: nothing says which is the trigger
    assert lora_trigger({"ss_tag_frequency": "not json"}) == ""


# -- the best-strength rule ----------------------------------------------------------------------

def _score(strength, style, fidelity):
    return StrengthScore(strength, style, fidelity, combined_score(style, fidelity))


def test_best_is_the_highest_combined_whose_fidelity_holds():
    scores = [_score(0.5, 0.60, 0.30), _score(0.6, 0.70, 0.29), _score(0.7, 0.80, 0.28), _score(0.8, 0.95, 0.20)]
    assert FIDELITY_MARGIN == 0.03
    best, note = pick_best(scores, base_fidelity=0.31)  # floor 0.28: 0.8 has collapsed
    assert best == 0.7 and "highest combined" in note
    assert pick_best(scores, base_fidelity=0.40)[0] == 0.5 and "no strength keeps" in pick_best(scores, 0.40)[1]
    # nothing collapsed: the combined score alone decides, and 0.8 loses more fidelity than it gains style
    assert pick_best(scores, base_fidelity=0.20)[0] == 0.7
    tie = [_score(0.6, 0.5, 0.3), _score(0.5, 0.5, 0.3)]
    assert pick_best(tie, base_fidelity=0.3)[0] == 0.5  # a tie goes to the lower strength


def test_rank_judges_against_the_base_column_else_the_lowest():
    base = _score(0.0, 0.50, 0.31)
    scores = [base, _score(0.5, 0.60, 0.30), _score(0.8, 0.95, 0.20)]
    report = rank_strengths(scores)
    assert report.base == base and [s.strength for s in report.scores] == [0.5, 0.8] and report.best == 0.5
    assert rank_strengths(scores, [0.0, 0.5]).best == 0.5  # 0 asked: a candidate too
    without_base = rank_strengths(scores[1:])
    assert without_base.base.strength == 0.5 and without_base.best == 0.5
    assert report.to_dict() == {"scores": [{"strength": 0.5, "style": 0.6, "fidelity": 0.3, "combined": 0.675},
                                           {"strength": 0.8, "style": 0.95, "fidelity": 0.2, "combined": 0.725}],
                                "best": 0.5}
    with pytest.raises(ValueError, match="not scored"):
        rank_strengths(scores, [0.7])
