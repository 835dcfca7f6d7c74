"""The tab's "Merge into checkpoint": the LoRA the tab trained, at a strength, baked into the Base model and written
as a new checkpoint where the host keeps its checkpoints, then the host's checkpoint list refreshed.

The merge is the core's (`lora_trainer.adapters.merge.merge_into_checkpoint`): a file operation on the CPU that streams the
base one tensor at a time. The host's loaded model and its GPU are never touched, so it is no host job: a generation
may run meanwhile. The backend says where checkpoints go (`Backend.checkpoint_dir`: A1111/Forge `--ckpt-dir` or
models/Stable-diffusion; standalone: beside the base), which strength the LoRA prefers (`preferred_strength`: the
A1111 card's preferred weight, else the file's usage hint) and how the host learns of the new file (`after_merge`).

No gradio here but `add_merge_panel`, which is handed the gradio module by `blocks.build_blocks`.
"""

from __future__ import annotations

import glob
import math
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Tuple

from ..errors import ConfigError, LoraTrainerError, ModelError
from .session import TrainSession, described

MERGE_STRENGTH = 1.0  # the strength offered when the tab knows no preferred weight for the LoRA
STRENGTH_RANGE = (-1.0, 2.0)  # the slider's; a negative strength takes the LoRA's direction out of the base
NAME_FIELD = "Merged checkpoint name"
POLL_SECONDS = 0.5
_NOT_IN_NAMES = re.compile(r'[\x00-\x1f<>:"/\\|?*]')  # folders, and what Windows refuses in a file name
_MERGING = threading.Lock()  # one merge at a time per process: each streams gigabytes through the disk


def trained_lora() -> Path:
    """The LoRA the tab trained last (its run may have ended with a warning, never unsaved)."""
    session = TrainSession.current
    result = session.result if session is not None else None
    if result is None or getattr(result, "lora_path", None) is None:
        if session is not None and session.running:
            raise ConfigError("The LoRA is still training: merge it when the run is done.")
        raise ConfigError("Train a LoRA first: Merge into checkpoint bakes the LoRA this tab trained into the "
                          "Base model.")
    return Path(result.lora_path)


def checked_strength(value: Any) -> float:
    """The strength field's value as a number in STRENGTH_RANGE, other than 0; else a line that says what to type."""
    low, high = STRENGTH_RANGE
    try:
        strength = float(value)
    except (TypeError, ValueError):
        strength = math.nan
    if not math.isfinite(strength) or not low <= strength <= high:
        raise ConfigError(f"Strength {value!r}: give a number from {low:g} to {high:g} (the LoRA's weight in the "
                          "merged checkpoint, as in <lora:name:weight>).")
    if strength == 0:
        raise ConfigError("Strength 0 merges nothing (the result would be the Base model): pick the LoRA's "
                          "weight, e.g. 0.8.")
    return strength


def merge_name(base_path: Path, lora_path: Path, strength: float) -> str:
    """The default file name: `<base stem>+<lora name>-<strength>.safetensors`."""
    return f"{Path(base_path).stem}+{Path(lora_path).stem}-{strength:g}.safetensors"


def is_default_name(name: str, lora_path: Path) -> bool:
    """True when `name` is blank or one `merge_name` gave for this LoRA (any base, any strength): it may follow the
    fields; a name the user typed is kept."""
    name = (name or "").strip()
    pattern = rf".*\+{re.escape(Path(lora_path).stem)}-[-+0-9.e]+\.safetensors"
    return not name or re.fullmatch(pattern, name) is not None


def checkpoint_file_name(text: str) -> str:
    """The name as typed, with `.safetensors` added when missing; refused when it is no plain file name."""
    name = (text or "").strip()
    stem = name[: -len(".safetensors")] if name.lower().endswith(".safetensors") else name
    if not stem or _NOT_IN_NAMES.search(stem) or stem.startswith(".") or stem.endswith((".", " ")):
        raise ConfigError(f'{NAME_FIELD} {text!r}: give a plain file name (no folders, not starting with ".", none '
                          'of <>:"/\\|?*).')
    return stem + ".safetensors"


def usage_hint_weight(lora_path: Path) -> Optional[float]:
    """The weight in the file's `modelspec.usage_hint` (`<lora:name:0.7> trigger`), or None."""
    from ..adapters.export import read_lora

    hint = read_lora(Path(lora_path), with_tensors=False)[1].get("modelspec.usage_hint", "")
    found = re.search(r"<lora:[^:>]+:([-+0-9.eE]+)>", hint)
    return float(found.group(1)) if found else None


def base_checkpoint(backend: Any, base_value: str) -> Path:
    """The checkpoint file the Base model field names (A1111: its title in the WebUI's list)."""
    value = (base_value or "").strip() or backend.default_base_model()
    path = Path(backend.resolve_base_model(value)).expanduser() if value else None
    if path is None or not path.is_file():
        raise ModelError(f"Base model {value or '(empty)'}: no checkpoint file there. Pick a checkpoint in "
                         "\"Base model\" (a .safetensors file).")
    return path


def field_values(backend: Any, base_value: str, name: str) -> Tuple[float, str]:
    """(strength, name) for the LoRA the tab trained last: its preferred strength (else MERGE_STRENGTH) and the
    default name, a typed name kept. What the fields show after Train and Test, and at page load."""
    try:
        lora = trained_lora()
    except ConfigError:
        return MERGE_STRENGTH, name or ""
    try:
        strength = backend.preferred_strength(lora) or MERGE_STRENGTH
        strength = checked_strength(strength)
    except (LoraTrainerError, OSError, ValueError):
        strength = MERGE_STRENGTH
    return strength, name_for(backend, base_value, strength, name)


def name_for(backend: Any, base_value: str, strength: Any, name: str) -> str:
    """The name field after the base or the strength changed: the default name follows them, a typed one stays."""
    try:
        lora = trained_lora()
        if not is_default_name(name, lora):
            return name
        return merge_name(base_checkpoint(backend, base_value), lora, checked_strength(strength))
    except LoraTrainerError:
        return name or ""


@dataclass
class MergePlan:
    lora: Path
    base: Path
    strength: float
    output: Path


def plan_merge(backend: Any, base_value: str, strength_value: Any, name: str) -> MergePlan:
    """Everything checked before a byte is written: the LoRA, the strength, the base file, the name, that nothing
    by that name exists (never overwritten) and that the disk has room."""
    lora = trained_lora()
    strength = checked_strength(strength_value)
    base = base_checkpoint(backend, base_value)
    file_name = checkpoint_file_name(name) if (name or "").strip() else merge_name(base, lora, strength)
    folder = Path(backend.checkpoint_dir(base))
    output = folder / file_name
    if output.exists():
        raise ConfigError(f'{output} already exists and is never overwritten: give another name in "{NAME_FIELD}".')
    folder.mkdir(parents=True, exist_ok=True)
    need, free = base.stat().st_size, shutil.disk_usage(folder).free
    if free < need * 1.05:
        raise ConfigError(f"Not enough free space in {folder}: the merged checkpoint needs about {_size(need)}, "
                          f"{_size(free)} is free.")
    return MergePlan(lora, base, strength, output)


def run_merge(backend: Any, base_value: str, strength_value: Any, name: str) -> Iterator[str]:
    """Merge, saying how far it got every POLL_SECONDS; the last line is the result or one line that says what to
    fix. The merge runs in its own thread: a closed page leaves it to finish (and to release the lock)."""
    try:
        plan = plan_merge(backend, base_value, strength_value, name)
    except LoraTrainerError as e:
        yield described(e)
        return
    if not _MERGING.acquire(blocking=False):
        yield "A merge is already running: wait for it to end."
        return
    outcome: dict = {}
    worker = threading.Thread(target=_merge_in_thread, args=(plan, outcome), name="lora-trainer-merge", daemon=True)
    start = time.monotonic()
    worker.start()
    what = f"Merging {plan.lora.name} at {plan.strength:g} into {plan.base.name} → {plan.output}"
    while worker.is_alive():
        yield f"{what}: {_written(plan)} of about {_size(plan.base.stat().st_size)} written " \
              f"({time.monotonic() - start:.0f} s)"
        worker.join(POLL_SECONDS)
    if "error" in outcome:
        yield f"Not merged: {described(outcome['error'])}"
        return
    lines = [f"Merged {plan.lora.name} at {plan.strength:g} into {plan.base.name}: {plan.output} "
             f"({_size(plan.output.stat().st_size)}, {time.monotonic() - start:.0f} s)"]
    try:
        lines.append(backend.after_merge(plan.output))
    except Exception as err:  # the checkpoint is written: a failed list refresh is a warning
        lines.append(f"Warning: the checkpoint list was not refreshed: {described(err)}")
    yield "\n".join(line for line in lines if line)


def _merge_in_thread(plan: MergePlan, outcome: dict) -> None:
    from ..adapters.merge import merge_into_checkpoint

    try:
        merge_into_checkpoint(plan.base, [(plan.lora, plan.strength)], plan.output)
    except Exception as err:  # shown in the tab; a bug's traceback goes to the console
        if not isinstance(err, LoraTrainerError):
            import traceback

            traceback.print_exc()
        outcome["error"] = err
    finally:
        _MERGING.release()


def _written(plan: MergePlan) -> str:
    """How much of the output is on disk: the merge writes it under a temporary name beside it (files.atomic_path)."""
    sizes = [p.stat().st_size for p in plan.output.parent.glob(f".{glob.escape(plan.output.name)}.*.tmp")
             if p.is_file()]
    return _size(max(sizes, default=0))


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB"


@dataclass
class MergePanel:
    strength: Any
    name: Any
    button: Any
    status: Any
    refresh_fields: Callable[..., Any]  # (base, name) → (strength, name): after Train and Test


def add_merge_panel(gr: Any, backend: Any, base: Any, js_kwargs: Callable[[Optional[str]], dict]) -> MergePanel:
    """The "Merge into checkpoint" accordion, wired; `base` is the tab's Base model dropdown (its choices follow the
    new checkpoint). Train and Test chain `refresh_fields` so the fields show the new LoRA's preferred strength."""
    def start_values() -> Tuple[float, str]:
        return field_values(backend, "", "")

    with gr.Accordion("Merge into checkpoint", open=False, elem_id="lora_trainer_merge"):
        with gr.Row():
            strength = gr.Slider(minimum=STRENGTH_RANGE[0], maximum=STRENGTH_RANGE[1], step=0.05,
                                 value=lambda: start_values()[0], label="Strength", elem_id="lora_trainer_merge_strength",
                                 info="The LoRA's weight in the new checkpoint (as <lora:name:weight>); it starts at "
                                      "the LoRA's preferred weight")
            name = gr.Textbox(label=NAME_FIELD, value=lambda: start_values()[1], elem_id="lora_trainer_merge_name",
                              info="A new file in the checkpoint folder (blank: <base>+<LoRA>-<strength>); an "
                                   "existing file is never replaced")
            button = gr.Button("Merge into checkpoint", elem_id="lora_trainer_merge_button")
        status = gr.Textbox(label="Merge status", interactive=False, elem_id="lora_trainer_merge_status")

    def on_merge(base_value, strength_value, name_value):
        line = ""
        for line in run_merge(backend, base_value, strength_value, name_value):
            yield line, gr.update()
        choices = backend.base_model_choices()  # the new checkpoint can be the next run's base
        yield line, gr.update(choices=choices) if choices else gr.update()

    def on_fields(base_value, name_value):
        return field_values(backend, base_value, name_value)

    def on_name(base_value, strength_value, name_value):
        return name_for(backend, base_value, strength_value, name_value)

    merged = button.click(on_merge, [base, strength, name], [status, base])
    if backend.checkpoints_js:
        merged.then(None, None, None, **js_kwargs(backend.checkpoints_js))
    for control in (base, strength):
        control.change(on_name, [base, strength, name], [name])
    return MergePanel(strength, name, button, status, on_fields)
