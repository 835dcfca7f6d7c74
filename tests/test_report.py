"""The run's report.html and the compare.html page: built from a fake run folder, read as text (no browser;
tests/ui/test_report_browser.py opens the same page in Chromium)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from lora_trainer.evaluate.report import write_compare_report, write_run_report

SAMPLE = "tiny-step00000004.png"


def make_run(folder: Path, name: str = "tiny <b>run</b>", best: float = 0.65, rank: int = 8) -> Path:
    """A run folder as a finished run leaves it: config, run.json, the jsonl log (resumed: step 3 twice),
    a sample grid PNG and the scores beside the LoRA."""
    from PIL import Image, ImageDraw

    (folder / "logs").mkdir(parents=True)
    (folder / "samples").mkdir()
    lora = folder / "tiny.safetensors"
    lora.write_bytes(b"not a real LoRA")
    cfg = {"output_name": "tiny", "trigger_word": "ink<b>wash</b>", "base_model": "/models/tiny-sd1.safetensors",
           "sample_strengths": [0.0, 0.5, 1.0], "lora_rank": rank, "output_dir": str(folder), "learning_rate": 1e-4}
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    run = {"name": name, "family": "sd1", "steps": 4, "total_steps": 4, "seconds": 75.0, "peak_bytes": 3 * 2**30,
           "peak_what": "peak RAM (process)", "device": "cpu", "stopped": False, "lora": str(lora),
           "scan": "6 images, 5 usable; 1 error(s)", "skipped": [["000_broken.png", "unreadable"]],
           "best": {"val_loss": 0.25, "step": 4, "path": str(folder / "tiny-best.safetensors")}}
    (folder / "run.json").write_text(json.dumps(run), encoding="utf-8")
    events = [{"event": "loss", "step": s, "loss": 1.0 / s, "lr": 1e-4} for s in (1, 2, 3)]
    events += [{"event": "validation", "step": 2, "val_loss": 0.9},
               {"event": "loss", "step": 3, "loss": 0.3, "lr": 1e-4},  # the resumed run's step 3: this one wins
               {"event": "loss", "step": 4, "loss": 0.2, "lr": 1e-4}, {"event": "validation", "step": 4, "val_loss": 0.25},
               {"event": "sample", "step": 4, "path": str(folder / "samples" / SAMPLE)},
               {"event": "saved", "path": str(lora), "final": True}]
    (folder / "logs" / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")
    grid = Image.new("RGB", (192, 96), "white")
    ImageDraw.Draw(grid).rectangle((8, 8, 88, 88), fill="#2860c8")
    grid.save(folder / "samples" / SAMPLE)
    scores = {"scores": [{"strength": s, "style": 0.2 + s / 10, "fidelity": 0.3, "combined": 0.25 + s / 20}
                         for s in (0.5, 0.65, 0.8)], "best": best, "note": "fidelity <kept> above the floor"}
    lora.with_suffix(".scores.json").write_text(json.dumps(scores), encoding="utf-8")
    return folder


def _external_links(text: str) -> list:
    return re.findall(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", text, flags=re.I)


def test_run_report_shows_the_run(tmp_path):
    out = write_run_report(make_run(tmp_path / "run"))
    assert out == tmp_path / "run" / "report.html" and out.is_file()
    text = out.read_text(encoding="utf-8")
    assert "tiny &lt;b&gt;run&lt;/b&gt;" in text and "<b>run</b>" not in text  # the name, escaped
    assert "ink&lt;b&gt;wash&lt;/b&gt;" in text and "<b>wash</b>" not in text  # a config value, escaped
    assert "&lt;lora:tiny:0.65&gt;" in text  # the scored strength, not the default 0.7
    assert "LoraLoader" in text and "tiny.safetensors" in text
    assert f'src="samples/{SAMPLE}"' in text and "step 4" in text
    assert re.search(r'<div id="loss-plot"[^>]*>\s*<svg', text)
    assert "000_broken.png" in text and "unreadable" in text and "6 images, 5 usable" in text
    assert "4/4 steps in 1 min 15 s" in text and "3.00 GB" in text and "finished" in text
    assert 'class="best"' in text and "fidelity &lt;kept&gt;" in text
    assert not _external_links(text)
    order = [text.index(f'id="{s}"') for s in ("how-to-use", "loss", "samples", "scores", "dataset", "config")]
    assert order == sorted(order)


def test_run_report_plot_keeps_the_later_line_of_a_step(tmp_path, monkeypatch):
    import lora_trainer.evaluate.loss_plot as loss_plot

    seen = {}
    real = loss_plot.loss_figure

    def spy(losses, *args, **kwargs):
        seen.update(losses=list(losses), **kwargs)
        return real(losses, *args, **kwargs)

    monkeypatch.setattr(loss_plot, "loss_figure", spy)
    write_run_report(make_run(tmp_path / "run"))
    assert seen["losses"] == [1.0, 0.5, 0.3, 0.2] and seen["first_step"] == 1
    assert seen["val"] == [(2, 0.9), (4, 0.25)]


def test_unscored_run_uses_the_default_strength(tmp_path):
    run = make_run(tmp_path / "run")
    (run / "tiny.scores.json").unlink()
    text = write_run_report(run).read_text(encoding="utf-8")
    assert "&lt;lora:tiny:0.7&gt;" in text
    assert "not scored yet: python -m lora_trainer score --lora" in text and "--strengths 0.5,1" in text


def test_a_folder_with_only_a_config_says_what_is_missing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"output_name": "early", "lora_rank": 4}), encoding="utf-8")
    text = write_run_report(run).read_text(encoding="utf-8")
    assert "<h1>early</h1>" in text and "&lt;lora:early:0.7&gt;" in text
    for line in ("no run.json", "no loss logged yet", "no sample grids", "not scored yet", "no dataset scan"):
        assert line in text
    assert "lora_rank" in text and 'id="loss-plot"' not in text


def test_compare_page_links_runs_and_shows_what_differs(tmp_path):
    runs = [make_run(tmp_path / "runs" / "r8", name="rank 8"), make_run(tmp_path / "runs" / "r16", name="rank 16",
                                                                          rank=16)]
    for run in runs:
        write_run_report(run)
    grid = tmp_path / "compare" / "grid.png"
    grid.parent.mkdir()
    (runs[0] / "samples" / SAMPLE).replace(grid)
    comparison = {"best": "rank 16", "notes": ["rank 16 <wins> on val_loss"], "runs": [
        {"name": r.name.replace("r", "rank "), "path": str(r), "config": yaml.safe_load((r / "config.yaml").read_text()),
         "val_loss_final": 0.25, "val_loss_best": None, "best_strength": 0.65, "clip_score": None, "steps": 4,
         "seconds": 75.0, "peak_bytes": None} for r in runs]}
    out = write_compare_report(tmp_path / "compare" / "compare.html", comparison, grid)
    text = out.read_text(encoding="utf-8")
    assert "rank 8" in text and "rank 16" in text
    assert 'href="../runs/r8/report.html"' in text and 'href="../runs/r16/report.html"' in text
    assert (out.parent / "../runs/r16/report.html").is_file()
    assert "lora_rank = 8" in text and "lora_rank = 16" in text
    assert "learning_rate =" not in text and "trigger_word =" not in text and "output_dir =" not in text
    best_row = re.search(r'<tr class="best">(.*?)</tr>', text).group(1)
    assert "rank 16" in best_row and "best" in best_row and text.count('<tr class="best">') == 1
    assert "&lt;wins&gt;" in text and "—" in text
    assert 'id="compare-grid" src="grid.png"' in text
    assert not _external_links(text)
