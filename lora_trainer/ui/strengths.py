"""The tab's Test: the LoRA at each test strength from one seed, scored, and the best strength written back.

The backend renders the pictures (A1111/Forge: the WebUI's own txt2img; standalone: the trainer's sampler) and
hands back what its host kept for them. Then, still inside the same host job, the CLIP half of the captioner's
CoCa model (the file picked in "Captioner weights", as captioning uses it) scores every strength against the
run's Image folder and the prompt (`lora_trainer.evaluate.score`): the grid gets the scores under each column, the status
names the best strength and the rule that chose it, and the backend writes that strength where the host keeps a
LoRA's settings (`Backend.after_test`: the file's `modelspec.usage_hint`; A1111 also the card's preferred weight).

Without the weights, or without a usable Image folder, nothing is scored: the grid is the plain one and the status
says why scoring was skipped. Whatever goes wrong in scoring or writing, the grid is still shown.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Sequence, Tuple

from ..errors import LoraTrainerError
from . import dataset_panel as panel
from .session import PREFERRED_STRENGTH, TEST_STRENGTHS, described, in_tab_words


@dataclass
class StrengthTest:
    grid: Any  # the labelled grid (PIL), scores under each column when scored
    infotext: str  # what "Send to txt2img" takes: the best strength's picture, else the PREFERRED_STRENGTH one
    status: str
    report: Any = None  # the StrengthReport, or None when scoring was skipped


def run_test(backend: Any, cfg: Any, lora_path: Path, prompt: str, seed: int, task_id: str = "",
             weights: str = "") -> StrengthTest:
    """Render TEST_STRENGTHS with `seed` through `backend`, score them with the captioner weights `weights`
    (the tab's field value; (auto) is the default), label the grid, write the best strength."""
    lora_path = Path(lora_path)
    prompt = (prompt or "").strip() or cfg.trigger_word or "a picture"
    lines = [f"grid at strengths {', '.join(f'{s:g}' for s in TEST_STRENGTHS)}"]
    pretrained, skipped = scoring_weights(backend, cfg, weights)  # before minutes of rendering
    report, left_out = None, ""
    with backend.test_job(task_id):
        pictures, infotexts = backend.test_pictures(cfg, lora_path, prompt, seed)
        if not skipped:  # the host's memory for the test is handed back by now: only then comes CoCa
            report, skipped, left_out = score_pictures(backend, cfg, pictures, prompt, pretrained)
    grid = label_grid(pictures, prompt, seed, report)
    grid_file = backend.test_grid_file(lora_path)
    if grid_file is not None:
        from ..files import atomic_write_with

        atomic_write_with(grid_file, lambda tmp: grid.save(tmp, format="PNG"))
    if report is None:
        lines.append(f"scoring skipped: {skipped}")
    else:
        lines += [best_line(report), left_out]
    try:
        lines.append(backend.after_test(cfg, lora_path, report.best if report is not None else None))
    except Exception as err:  # the grid is there: a failed write is a warning
        traceback.print_exc()
        lines.append(f"Warning: the best strength was not written: {described(err)}")
    shown = report.best if report is not None else PREFERRED_STRENGTH
    infotext = infotexts[list(TEST_STRENGTHS).index(shown)] if shown in TEST_STRENGTHS else ""
    return StrengthTest(grid, infotext, "\n".join(line for line in lines if line), report)


def scoring_weights(backend: Any, cfg: Any, weights: str) -> Tuple[str, str]:
    """(the captioner weights to score with, ''), or ('', why scoring is skipped) in the tab's words. Cheap: the
    weights file is looked up, not loaded; the Image folder's images are listed, not opened."""
    from ..data.captions.weights import MissingWeights
    from ..evaluate.score import check_weights, reference_files

    folder = Path(str(cfg.train_data_dir or "")).expanduser()
    try:
        pretrained = panel.weights_option(weights, backend)
        check_weights(scorer_model(backend), pretrained)
        if not folder.is_dir():
            return "", f"the run's Image folder {folder} is not there any more (style is scored against its images)."
        reference_files(folder)
    except MissingWeights as e:  # where this host's users put weights, and the tab's field
        return "", e.in_words(folder=panel.weights_folder(backend), field=panel.WEIGHTS_FIELD)
    except LoraTrainerError as e:
        return "", in_tab_words(str(e))
    except ImportError as e:  # open_clip missing: the grid goes on without scores
        return "", f"the scorer cannot be imported ({e}); install open_clip_torch."
    return pretrained, ""


def score_pictures(backend: Any, cfg: Any, pictures: Sequence[Any], prompt: str,
                   pretrained: str) -> Tuple[Any, str, str]:
    """(report, '', a note on unreadable reference images) or (None, why it could not score, ''). CoCa is loaded here
    and released before this returns, inside the backend's `scoring_memory` (A1111: its model off the GPU)."""
    from ..data.captions.weights import MissingWeights
    from ..evaluate.score import StrengthScorer, rank_strengths

    callbacks = backend.progress_callbacks()
    try:
        with backend.scoring_memory():
            with StrengthScorer(cfg.train_data_dir, scorer_model(backend), pretrained,
                                on_status=callbacks.on_status if callbacks is not None else None) as scorer:
                if callbacks is not None:
                    callbacks.on_status("scoring the test pictures")
                scores = scorer.score_images([list(pictures)], TEST_STRENGTHS, [prompt], cfg.trigger_word)
    except MissingWeights as e:
        return None, e.in_words(folder=panel.weights_folder(backend), field=panel.WEIGHTS_FIELD), ""
    except LoraTrainerError as e:
        return None, in_tab_words(str(e)), ""
    except Exception as e:  # out of memory, a damaged weights file: the grid still comes
        traceback.print_exc()
        return None, f"{type(e).__name__}: {e}", ""
    left_out = (f"{len(scorer.skipped)} image(s) of the Image folder could not be read and are left out of the style "
                f"score: {'; '.join(scorer.skipped[:3])}" if scorer.skipped else "")
    return rank_strengths(scores, [s for s in TEST_STRENGTHS if s]), "", left_out


def scorer_model(backend: Any) -> str:
    from ..data.captions.captioner import DEFAULT_MODEL

    return getattr(backend, "captioner_model", None) or DEFAULT_MODEL


def label_grid(pictures: Sequence[Any], prompt: str, seed: int, report: Any = None) -> Any:
    """The one-row grid: "strength w" over each column; when scored, BASE/BEST marks and each column's scores
    under it. Narrow columns keep "0.7 BEST" and "style .81" (the first part of the scores)."""
    from ..evaluate.sample import label_grid as grid_of

    labels = [f"strength {s:g}" for s in TEST_STRENGTHS]
    if report is None:
        return grid_of([list(pictures)], labels, [prompt], seed)
    scores: Dict[float, Any] = {s.strength: s for s in [report.base, *report.scores]}
    marks = {report.base.strength: " BASE", report.best: " BEST"}
    labels = [label + marks.get(s, "") for label, s in zip(labels, TEST_STRENGTHS)]
    return grid_of([list(pictures)], labels, [prompt], seed, [score_note(scores[s]) for s in TEST_STRENGTHS])


def score_note(score: Any) -> str:
    """A column's scores as the grid shows them: "style .81 · fidelity .29 · combined .77"."""
    return " · ".join(f"{name} {_short(value)}" for name, value in
                      (("style", score.style), ("fidelity", score.fidelity), ("combined", score.combined)))


def _short(value: float) -> str:
    return f"{value:.2f}".replace("0.", ".", 1)  # 0.81 → .81, -0.05 → -.05: narrow columns keep the number


def best_line(report: Any) -> str:
    """"best strength 0.7 (combined 0.771): <the rule>", the rule as the core words it."""
    best = next(s for s in report.scores if s.strength == report.best)
    rule = report.note.split(", ", 1)[1] if report.note.startswith("best: ") else report.note
    return f"best strength {report.best:g} (combined {best.combined:.3f}): {rule}"


