"""The tab's dataset side, without gradio: Load (the images, their captions and the dataset doctor's
findings), Caption empty ones (with the captioner weights picked in the tab), Add images.

Each function returns what the tab's outputs show, one value per output: the gallery, the captions
table, the findings table (`doctor.TABLE_COLUMNS`) and the status line. Messages are in the tab's
words (`session.in_tab_words`): its field labels, never config keys or CLI flags.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List, Mapping, Optional, Tuple

from ..errors import CaptionError, ConfigError, LoraTrainerError
from .session import form_to_config, in_tab_words
from .uploads import add_files, upload_paths

AUTO_WEIGHTS = "(auto)"  # the captioner's default weights, from the lora_trainer or Hugging Face cache
WEIGHTS_FIELD = "Captioner weights"
Shown = Tuple[List[Any], List[List[str]], List[List[str]], str]  # gallery, captions, findings, status


def read_rows(folder: str) -> List[List[str]]:
    """[[image name, caption]] for the folder's images ('' where there is no caption); read only."""
    from ..data.captions import read_captions
    from ..data.images import list_images

    folder_path = image_folder(folder)
    captions = read_captions(folder_path).captions
    rows = []
    for p in list_images(folder_path):
        name = p.relative_to(folder_path).as_posix()
        rows.append([name, captions.get(name, "")])
    return rows


def image_folder(folder: str) -> Path:
    """The Image folder as typed; an empty or missing one is an error (never the WebUI's working folder)."""
    text = (folder or "").strip()
    if not text:
        raise ConfigError("Pick the Image folder first.")
    path = Path(text).expanduser()
    if not path.is_dir():
        raise LoraTrainerError(f"Image folder not found: {path}")
    return path


def save_captions(folder: str, rows: List[List[str]]) -> str:
    """Write the captions table to the folder's metadata.csv (atomically); the status line."""
    from ..data.captions import write_captions

    try:
        captions = {r[0]: r[1] for r in rows or [] if r and r[0] and str(r[1]).strip()}
        path = write_captions(image_folder(folder), captions, fmt="csv")
    except LoraTrainerError as e:
        return in_tab_words(str(e))
    return f"saved {len(captions)} captions to {path}"


def doctor_config(folder: str, trigger: str, preset: str, low_vram: bool, advanced: Mapping[str, Any]) -> Tuple[Any, str]:
    """The settings the doctor checks against (buckets, resolution, steps): the form's, as a run would get them.
    When the form holds a value the config refuses, the defaults, with a note that says why."""
    from ..config import TrainConfig

    try:
        return form_to_config("doctor", folder, "", trigger, preset, low_vram, advanced, "."), ""
    except ConfigError as e:
        note = f"(Checked with the default settings: {in_tab_words(str(e))})"
        return TrainConfig(train_data_dir=str(folder).strip(), trigger_word=(trigger or "").strip()), note


def look_at(folder: str, trigger: str = "", preset: str = "style", low_vram: bool = False,
            advanced: Optional[Mapping[str, Any]] = None) -> Shown:
    """What Load shows: the readable images, every image's caption, the doctor's findings and its summary."""
    from ..data.doctor import examine

    try:
        path = image_folder(folder)
        rows = read_rows(str(path))
        cfg, note = doctor_config(str(path), trigger, preset, low_vram, advanced or {})
        report = examine(path, cfg, trigger=trigger)
    except LoraTrainerError as e:
        return [], [], [], in_tab_words(str(e))
    unreadable = {f.file for f in report.findings if f.problem == "unreadable"}
    pictures = [(str(path / name), caption) for name, caption in rows if name not in unreadable]
    return pictures, rows, report.table_rows(), doctor_status(report, note)


def doctor_status(report: Any, note: str = "") -> str:
    """The doctor's summary, then the images training would skip, named."""
    lines = [report.summary()]
    skipped = [f"{f.file} ({f.problem})" for f in report.errors if f.problem != "no_images"]
    if skipped:
        lines.append(f"Training skips {len(skipped)}: {', '.join(skipped)}. The findings below say what to do.")
    elif report.findings:
        lines.append("The findings below say what to check.")
    if note:
        lines.append(note)
    return "\n".join(lines)


def add_images(files: Any, folder: str, trigger: str = "", preset: str = "style", low_vram: bool = False,
               advanced: Optional[Mapping[str, Any]] = None) -> Shown:
    """Copy the uploaded files (a gr.File value, either gradio major) into the Image folder, then Load it."""
    try:
        added = add_files(folder, upload_paths(files)).summary()
    except LoraTrainerError as e:
        added = in_tab_words(str(e))
    pictures, rows, findings, status = look_at(folder, trigger, preset, low_vram, advanced)
    return pictures, rows, findings, f"{added}\n{status}"


def caption_empty(backend: Any, task_id: str, folder: str, trigger: str, weights: str, preset: str = "style",
                  low_vram: bool = False, advanced: Optional[Mapping[str, Any]] = None) -> Shown:
    """Caption the images without one (trigger word first), with the picked weights; then Load again."""
    from ..data.captions import MissingWeights

    try:
        pretrained = weights_option(weights, backend)
        done = backend.caption(image_folder(folder), trigger, task_id=task_id or backend.new_task_id(),
                               weights=pretrained)
        message = f"captioned {done} images"
    except MissingWeights as e:  # where this host's users put weights, and the tab's field: not the CLI's flags
        message = e.in_words(folder=weights_folder(backend), field=WEIGHTS_FIELD)
    except LoraTrainerError as e:
        message = in_tab_words(str(e))
    pictures, rows, findings, status = look_at(folder, trigger, preset, low_vram, advanced)
    return pictures, rows, findings, f"{message}\n{status}"


def weights_folder(backend: Any) -> Path:
    """The host's folder for captioner weights, made when first named so the user can drop files in."""
    folder = Path(backend.captioner_weights_dir())
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass  # named all the same: the message says where
    return folder


def weight_choices(backend: Any) -> List[str]:
    """(auto), then the weights files in the host's folder and the lora_trainer cache's. The default weights in
    the Hugging Face cache are what (auto) finds, so they are not listed: that look-up would import open_clip
    (seconds) while the WebUI builds its tabs."""
    from ..data.captions import DEFAULT_MODEL, available_weights

    found = available_weights(DEFAULT_MODEL, "", (backend.captioner_weights_dir(),))
    return [AUTO_WEIGHTS, *dict.fromkeys(str(p) for p in found)]


def weights_option(value: str, backend: Any) -> str:
    """CaptionOptions.pretrained for the picked value: (auto) is the default tag; a typed path must exist."""
    from ..data.captions import DEFAULT_MODEL, DEFAULT_PRETRAINED
    from ..data.captions.weights import WEIGHT_SUFFIXES

    value = (value or "").strip()
    if value in ("", AUTO_WEIGHTS):
        return DEFAULT_PRETRAINED
    path = Path(value).expanduser()
    looks_like_path = path.suffix.lower() in WEIGHT_SUFFIXES or "/" in value or os.sep in value
    if looks_like_path and not path.exists():
        raise CaptionError(f"{WEIGHTS_FIELD}: no file at {value}. Put a {DEFAULT_MODEL} weights file in "
                           f"{weights_folder(backend)}{os.sep} and pick it, or pick {AUTO_WEIGHTS}.")
    return value
