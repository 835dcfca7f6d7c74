"""Strength scoring: which LoRA strength carries the style and still draws what the prompt asks for.

Every strength asked is rendered from one seed (`sample.render_images`), with strength 0 (the base
model) beside them as the reference, and each picture is scored with the CLIP half of the
captioner's CoCa model: the same weights file `caption` uses, found the same way
(`captions.weights.find_weights`: a path, else the pretrained tag looked up on this machine).
Nothing is downloaded.

For one strength s, over the prompts (one picture per prompt, all from the same seed):

- style(s) = the mean cosine similarity of the pictures to the reference images (the training
  images): each picture against every reference image, averaged;
- fidelity(s) = the mean cosine similarity of each picture to its own prompt with the trigger word
  taken out (what the picture should show, without the LoRA's word for its style);
- combined(s) = (style(s) + 2.5 × fidelity(s)) / 2. CLIP puts a picture and a fitting caption
  near cosine 0.3 and two related pictures near 0.8; 2.5 is CLIPScore's factor (Hessel et al.,
  2021), which brings the two onto one scale.

The best strength: the highest combined score among the strengths asked whose fidelity has not
collapsed, i.e. fidelity(s) ≥ fidelity(base) − 0.03, the base being the strength-0 render (when
given pictures have no 0 column: the lowest strength given). When no strength asked passes, the
best is the lowest strength asked, and the report says so.

Same inputs, same numbers: one seed for every render, and cuDNN held to deterministic kernels
while rendering and scoring. The trigger word is `--trigger`, else read from the LoRA's metadata
(`lora_trigger`).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, List, Mapping, Optional, Sequence, Tuple

from ..data.captions.captioner import DEFAULT_MODEL, DEFAULT_PRETRAINED
from ..errors import DatasetError

FIDELITY_WEIGHT = 2.5  # CLIPScore's w: image-text cosines onto the scale of image-image ones
FIDELITY_MARGIN = 0.03  # how far fidelity may fall below the base's before it counts as collapsed
_BATCH = 16


@dataclass(frozen=True)
class StrengthScore:
    strength: float
    style: float  # mean cosine similarity to the reference images
    fidelity: float  # mean cosine similarity to the prompts without the trigger word
    combined: float  # (style + 2.5 × fidelity) / 2


@dataclass(frozen=True)
class StrengthReport:
    scores: List[StrengthScore]  # the strengths asked, in the order asked
    best: float
    base: StrengthScore  # the reference render fidelity is judged against (strength 0 when rendered)
    note: str  # one line: why `best` was chosen

    def to_dict(self) -> dict:
        """`{"scores": [{"strength", "style", "fidelity", "combined"}], "best"}`, numbers to 4 decimals."""
        return {"scores": [{k: round(v, 4) for k, v in asdict(s).items()} for s in self.scores], "best": self.best}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def table(self) -> str:
        """The scores as a small text table, base first, the best marked."""
        lines = [f"{'strength':>10}  {'style':>7}  {'fidelity':>8}  {'combined':>8}"]
        rows = [(self.base, "base")] if self.base.strength not in [s.strength for s in self.scores] else []
        rows += [(s, "best" if s.strength == self.best else "") for s in self.scores]
        for s, mark in rows:
            lines.append(f"{s.strength:>10g}  {s.style:7.4f}  {s.fidelity:8.4f}  {s.combined:8.4f}  {mark}".rstrip())
        return "\n".join(lines + [self.note])


def combined_score(style: float, fidelity: float) -> float:
    return (style + FIDELITY_WEIGHT * fidelity) / 2


def pick_best(scores: Sequence[StrengthScore], base_fidelity: float,
              margin: float = FIDELITY_MARGIN) -> Tuple[float, str]:
    """(best strength, why): the highest combined score whose fidelity ≥ base_fidelity − margin, else the
    lowest strength (a tie goes to the lower strength)."""
    if not scores:
        raise ValueError("pick_best needs at least one score")
    floor = base_fidelity - margin
    kept = [s for s in scores if s.fidelity >= floor]
    if not kept:
        lowest = min(s.strength for s in scores)
        return lowest, (f"no strength keeps the prompt (fidelity ≥ {floor:.4f}, the base's − {margin:g}): "
                        f"best is the lowest asked, {lowest:g}")
    best = max(kept, key=lambda s: (s.combined, -s.strength))
    return best.strength, (f"best: {best.strength:g}, the highest combined score whose fidelity stays within "
                           f"{margin:g} of the base's ({base_fidelity:.4f})")


def rank_strengths(scores: Sequence[StrengthScore], asked: Optional[Sequence[float]] = None,
                   margin: float = FIDELITY_MARGIN) -> StrengthReport:
    """The report over `asked` (default: every strength scored but a 0 column), judged against the 0 column
    (else the lowest strength scored)."""
    by_strength = {s.strength: s for s in scores}
    base = by_strength[0.0] if 0.0 in by_strength else min(scores, key=lambda s: s.strength)
    asked = (list(dict.fromkeys(float(a) for a in asked)) if asked is not None
             else [s.strength for s in scores if s.strength != 0.0])
    asked = asked or [base.strength]
    missing = [a for a in asked if a not in by_strength]
    if missing:
        raise ValueError(f"strengths {missing} were not scored")
    chosen = [by_strength[a] for a in asked]
    best, note = pick_best(chosen, base.fidelity, margin)
    return StrengthReport(chosen, best, base, note)


def scores_path(lora_path: Any) -> Path:
    """Where a LoRA's strength scores are kept: `<lora>.scores.json` beside the file (read by report and compare)."""
    return Path(lora_path).with_suffix(".scores.json")


def save_scores(lora_path: Any, report: StrengthReport) -> Path:
    """Keep `report` beside the LoRA, and redraw its run's report.html when the LoRA sits in a run folder."""
    from ..files import atomic_write_text

    kept = atomic_write_text(scores_path(lora_path), json.dumps({**report.to_dict(), "note": report.note}))
    run_dir = Path(lora_path).parent
    if (run_dir / "run.json").is_file():
        from .report import write_run_report

        write_run_report(run_dir)
    return kept


def read_scores(lora_path: Any) -> Optional[dict]:
    """The kept scores of a LoRA, or None when it was never scored."""
    try:
        return json.loads(scores_path(lora_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def with_base(strengths: Sequence[float]) -> List[float]:
    """The strengths to render: 0 (the base, the fidelity reference) first, then those asked, once each."""
    return list(dict.fromkeys([0.0, *(float(s) for s in strengths)]))


def lora_trigger(metadata: Mapping[str, str]) -> str:
    """The trigger word a LoRA file names: our config's trigger_word, else `modelspec.trigger_phrase`, else
    the one tag every training caption holds (`ss_tag_frequency` against `ss_dataset_dirs`); "" if none."""
    config = _json(metadata.get("lora_trainer.config"))
    if isinstance(config, dict) and str(config.get("trigger_word") or "").strip():
        return str(config["trigger_word"]).strip()
    phrase = str(metadata.get("modelspec.trigger_phrase") or "").strip()
    if phrase:
        return phrase
    frequency, dirs = _json(metadata.get("ss_tag_frequency")), _json(metadata.get("ss_dataset_dirs"))
    if not isinstance(frequency, dict) or not isinstance(dirs, dict):
        return ""
    images = sum(int(d.get("img_count", 0)) for d in dirs.values() if isinstance(d, dict))
    counts: dict = {}
    for tags in frequency.values():
        for tag, n in (tags.items() if isinstance(tags, dict) else ()):
            counts[tag.strip()] = counts.get(tag.strip(), 0) + int(n)
    everywhere = [t for t, n in counts.items() if t and n >= images > 0]
    return everywhere[0] if len(everywhere) == 1 else ""  # several: nothing says which one is the trigger


def read_trigger(lora_path: Any) -> str:
    """`lora_trigger` of a LoRA file's metadata (its tensors are not read)."""
    from ..adapters.export import read_lora

    return lora_trigger(read_lora(Path(lora_path), with_tensors=False)[1])


def check_weights(model: str = DEFAULT_MODEL, weights: str = DEFAULT_PRETRAINED, weights_dir: Optional[str] = None,
                  hf_cache_dir: Optional[str] = None) -> Any:
    """The CoCa weights file scoring would use; raises MissingWeights (a CaptionError) saying what to get.
    Cheap: lets a front end say "scoring skipped: …" before it renders anything."""
    from ..data.captions.coca import resolve_model_name
    from ..data.captions.weights import find_weights

    return find_weights(resolve_model_name(model), weights, weights_dir, hf_cache_dir)


class StrengthScorer:
    """Holds the CoCa model and the reference embedding between calls; `close()` gives the memory back."""

    def __init__(self, reference_dir: Any, model: str = DEFAULT_MODEL, weights: str = DEFAULT_PRETRAINED,
                 device: str = "auto", half: Optional[bool] = None, weights_dir: Optional[str] = None,
                 hf_cache_dir: Optional[str] = None, on_status: Optional[Callable[[str], None]] = None) -> None:
        """Load the model (MissingWeights when its weights are not here) and encode the reference images
        (unreadable ones are skipped and listed in `skipped`; none readable is a DatasetError)."""
        from ..data.captions import coca
        from ..data.images import ImageLoadError, load_image

        images, self.skipped = [], []  # skipped: "name: reason"
        for path in reference_files(reference_dir):
            try:
                images.append(load_image(path).image)
            except ImageLoadError as e:
                self.skipped.append(f"{path.name}: {e}")
        if not images:
            raise DatasetError(f"None of the images in {reference_dir} can be read: {'; '.join(self.skipped)[:300]}")
        if on_status:
            on_status(f"loading {model} to score ({Path(weights).name or weights})")
        self.coca: Any = coca.load_coca(model, weights, device, half, weights_dir, hf_cache_dir)
        try:
            self.reference = self.image_features(images).mean(dim=0)  # a mean of unit vectors: see score_images
        except BaseException:
            self.close()
            raise
        self.reference_count = len(images)

    def image_features(self, images: Sequence[Any]) -> Any:
        """Normalized CLIP image embeddings (N, D), float32 on the CPU, of PIL images."""
        import torch

        from ..data.captions.coca import encode_images

        if self.coca is None:
            raise RuntimeError("This scorer was closed; create a new one.")
        chunks = []
        with deterministic():
            for start in range(0, len(images), _BATCH):
                pixels = torch.stack([self.coca.preprocess(i.convert("RGB")) for i in images[start:start + _BATCH]])
                chunks.append(encode_images(self.coca, pixels)[0].cpu())
        return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)

    def text_features(self, texts: Sequence[str]) -> Any:
        """Normalized CLIP text embeddings (N, D), float32 on the CPU."""
        from ..data.captions.coca import encode_texts

        with deterministic():
            return encode_texts(self.coca, list(texts)).cpu()

    def score_images(self, rows: Sequence[Sequence[Any]], strengths: Sequence[float], prompts: Sequence[str],
                     trigger: str = "") -> List[StrengthScore]:
        """One score per column of `rows[prompt][strength]` (what `sample.render_images` returns)."""
        from ..data.captions.shape import remove_trigger

        if len(rows) != len(prompts) or any(len(row) != len(strengths) for row in rows):
            raise ValueError("rows must be images[prompt][strength] for the prompts and strengths given")
        texts = self.text_features([remove_trigger(p, trigger) for p in prompts])  # (P, D)
        scores = []
        for column, strength in enumerate(strengths):
            images = self.image_features([row[column] for row in rows])  # (P, D)
            # x · mean(r̂) = mean(x · r̂): the mean similarity to the references, in one product
            style = float((images @ self.reference).mean())
            fidelity = float((images * texts).sum(dim=-1).mean())
            scores.append(StrengthScore(float(strength), style, fidelity, combined_score(style, fidelity)))
        return scores

    def close(self) -> None:
        """Release the model and empty the CUDA cache (safe to call twice)."""
        from ..data.captions import coca

        model, self.coca = getattr(self, "coca", None), None
        if model is not None:
            coca.release(model)

    def __enter__(self) -> StrengthScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def reference_files(folder: Any) -> List[Path]:
    """The image files of the reference folder (listed, not opened): a DatasetError when there are none."""
    from ..data.images import list_images

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"Reference folder not found: {folder}. Give the folder of the training images.")
    files = list_images(folder)
    if not files:
        raise DatasetError(f"No images in {folder} to score the style against "
                           "(.jpg, .jpeg, .png, .webp or .bmp files directly in the folder).")
    return files


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """cuDNN's deterministic kernels, no autotuning, for the duration (the host's settings come back)."""
    import torch

    backend = torch.backends.cudnn
    before = backend.deterministic, backend.benchmark
    backend.deterministic, backend.benchmark = True, False
    try:
        yield
    finally:
        backend.deterministic, backend.benchmark = before


def _json(text: Any) -> Any:
    try:
        return json.loads(text) if isinstance(text, str) and text else None
    except ValueError:
        return None
