"""Caption checks: missing captions, captions for missing images, the trigger word, CLIP's 75 tokens.

Captions are read with `captions.read_captions` and matched to images with `CaptionSet.caption_for`,
as training does. The token count is `captions.shape`'s (the captioner's, so a caption it wrote is
never flagged), on the caption training encodes: `trigger_word` put first when it lacks it.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import TYPE_CHECKING

from ..captions import CaptionProblem, CaptionSet
from ..captions.shape import MAX_TOKENS
from ..dataset import apply_trigger, unmatched_captions
from .report import Finding

if TYPE_CHECKING:
    from ...config import TrainConfig


def caption_findings(folder: Path, images: list[Path], readable: set[str], captions: CaptionSet,
                     cfg: TrainConfig, trigger: str) -> list[Finding]:
    """Findings about the captions of `images` (those named in `readable` decoded) and the caption files."""
    found = [_file_problem(p) for p in captions.problems]
    found += _orphans(folder, images, captions, cfg.caption_extension)
    for path in images:
        if path.name not in readable:
            continue  # an unreadable image is reported as such; its caption does not matter
        caption = captions.caption_for(path.name)
        if not caption:
            found.append(_no_caption(path, captions, cfg))
            continue
        if trigger and apply_trigger(caption, trigger) != caption:
            found.append(_missing_trigger(path.name, trigger, cfg))
        trained = apply_trigger(caption, cfg.trigger_word)
        if len(trained.encode("utf-8")) > MAX_TOKENS:  # a token is at least a byte: shorter ones always fit
            found += _too_long(path.name, trained, cfg)
    return found


def _file_problem(problem: CaptionProblem) -> Finding:
    where = f"line {problem.line} of {problem.source}" if problem.line else problem.source
    if "UTF-8" in problem.reason:
        fix = f"Check the text of {where} and save {problem.source} as UTF-8."
    elif "takes precedence" in problem.reason:
        fix = f"Merge {problem.source} into metadata.csv and delete it, or delete it."
    elif "sidecar" in problem.reason:
        fix = "Delete those sidecar files, or move their captions into the metadata file."
    else:
        fix = f"Correct {where}: training skips or misreads it too."
    detail = (f"line {problem.line}: " if problem.line else "") + problem.reason
    return Finding(problem.source, "caption_file", "warning", detail, fix)


def _orphans(folder: Path, images: list[Path], captions: CaptionSet, extension: str) -> list[Finding]:
    found = []
    names = [p.name for p in images]
    meta = captions.metadata_file
    for name in unmatched_captions(captions.captions, images) if meta is not None else []:
        close = difflib.get_close_matches(name.rsplit("/", 1)[-1], names, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        found.append(Finding(
            name, "orphan_caption", "warning", f"{meta.name} has a caption for {name}, which is not in the folder{hint}",
            f"Fix the name in {meta.name}, put the image back, or delete that line."))
    ext = extension if extension.startswith(".") else f".{extension}"
    sidecars = {p.with_suffix(ext) for p in images}
    for path in sorted(folder.glob(f"*{ext}")):
        if path not in sidecars and path.is_file() and not path.name.startswith(".") and path != meta:
            found.append(Finding(
                path.name, "orphan_caption", "warning",
                f"{path.name} is a caption sidecar ({ext}) but no image is named {path.stem}.*",
                "Delete it, or rename it to match its image."))
    return found


def _no_caption(path: Path, captions: CaptionSet, cfg: TrainConfig) -> Finding:
    if captions.caption_for(path.name) is not None:
        where = "its caption is empty"
    elif captions.metadata_file is not None:
        where = f"{captions.metadata_file.name} has no line for it and there is no {path.stem}{cfg.caption_extension}"
    else:
        where = f"there is no {path.stem}{cfg.caption_extension} and no metadata.csv"
    used = f"the trigger word '{cfg.trigger_word}' alone" if cfg.trigger_word else "an empty caption"
    return Finding(path.name, "no_caption", "warning", f"{where}: training uses {used}",
                   "Caption it (the captioner fills in only images without a caption), or delete the image.")


def _missing_trigger(name: str, trigger: str, cfg: TrainConfig) -> Finding:
    if cfg.trigger_word.strip().lower() == trigger.strip().lower():
        return Finding(name, "missing_trigger", "info",
                       f"the caption lacks '{trigger}'; training puts it first (trigger_word), so it is learnt anyway",
                       "Nothing to do; write it into the caption only where it should not come first.")
    return Finding(name, "missing_trigger", "warning",
                   f"the caption lacks '{trigger}' and trigger_word does not add it, so the LoRA does not tie "
                   "this image to the trigger",
                   f"Add '{trigger}' to the caption, or set trigger_word: {trigger} so training puts it first.")


def _too_long(name: str, caption: str, cfg: TrainConfig) -> list[Finding]:
    from ..captions.shape import clip_cut

    count, kept, lost = clip_cut(caption, MAX_TOKENS)
    if count <= MAX_TOKENS:
        return []
    tail = kept if len(kept) <= 40 else "…" + kept[-40:].split(" ", 1)[-1]
    shuffled = "; with shuffle_caption a different part is cut each step" if cfg.shuffle_caption else ""
    return [Finding(
        name, "caption_too_long", "warning",
        f"{count} CLIP tokens, {count - MAX_TOKENS} over the {MAX_TOKENS} the text encoder reads: it stops after "
        f"\"{tail}\" and never sees \"{lost}\"{shuffled}",
        f"Shorten it to {MAX_TOKENS} tokens, most important words first.")]
