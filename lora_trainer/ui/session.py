"""What the Train LoRA tab does, without gradio: form → config, a training run in a thread, the loss plot.

The A1111/Forge tab and the standalone `python -m lora_trainer ui` share this; each passes a
backend (see `blocks.Backend`) for what differs: the base model, the GPU, the test grid.
"""

from __future__ import annotations

import inspect
import re
import threading
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from ..callbacks import Callbacks, MultiCallbacks
from ..config import TrainConfig, config_from_dict, field_help
from ..errors import ConfigError, LoraTrainerError, in_field_words

# Presets are starting points, applied over the defaults and under whatever the user changed.
PRESETS: Dict[str, Dict[str, Any]] = {
    "style": {"lora_rank": 16, "lora_alpha": 16, "learning_rate": 1e-4, "epochs": 10, "flip_aug": True},
    "character": {"lora_rank": 32, "lora_alpha": 16, "learning_rate": 1e-4, "epochs": 12, "flip_aug": False},
    "object": {"lora_rank": 16, "lora_alpha": 8, "learning_rate": 1e-4, "epochs": 10, "flip_aug": True},
}
# Flux.1 (Forge): 1024 px, the blocks' attention and MLP, fp8 base and checkpointing for a 24 GB card; the
# 12 GB preset adds block offload (the plan's predictions for Flux-dev: docs/flux.md)
_FLUX = {"lora_rank": 16, "lora_alpha": 16, "learning_rate": 1e-4, "epochs": 10, "flip_aug": False,
         "target_modules": ["attn", "ff"], "resolution": 1024, "gradient_checkpointing": True,
         "base_precision": "fp8", "batch_size": 1, "cache_latents": True}
PRESETS["Flux (24 GB)"] = dict(_FLUX)
PRESETS["Flux (12 GB)"] = dict(_FLUX, offload="blocks")
LOW_VRAM = {"batch_size": 1, "gradient_accumulation_steps": 4, "gradient_checkpointing": True,
            "cache_latents": True, "base_precision": "fp8"}
# The options a preset or Low VRAM sets: the tab's form updates these when either changes.
PRESET_FIELDS = frozenset(LOW_VRAM).union(*PRESETS.values())
# Fields that have their own place in the tab rather than in the generated advanced form.
MAIN_FIELDS = ("train_data_dir", "base_model", "trigger_word", "output_name", "output_dir")
TEST_STRENGTHS = (0.0, 0.5, 0.6, 0.7, 0.8)
# A new LoRA's strength (A1111: its card's preferred weight; the picture "Send to txt2img" takes) until Test scores one.
PREFERRED_STRENGTH = 0.8
# The config keys the tab shows under its own labels: its messages name the field the user sees
# ("Image folder not found"), the CLI keeps the keys. The advanced form's labels are the keys themselves.
TAB_FIELDS = {"train_data_dir": "Image folder", "output_name": "LoRA name", "trigger_word": "Trigger word",
              "base_model": "Base model"}
# The captioner's advice in the CLI's flags, as the tab says it (its weights picker; one captioner model).
CLI_PHRASES = {
    "Check the --pretrained path.": 'Check the path in "Captioner weights".',
    "Choose the --model these weights belong to.": 'Pick coca_ViT-L-14 weights in "Captioner weights".',
    "Pass --pretrained PATH to a .safetensors/.bin file, or a tag such as mscoco_finetuned_laion2B-s13B-b90k.":
        'Pick a .safetensors/.bin file in "Captioner weights", or (auto).',
    "pass --pretrained PATH (a weights file) or an open_clip pretrained tag.": 'pick a file in "Captioner weights".',
    "give another --output.": 'give another name in "Merged checkpoint name".',  # merge: a file appeared meanwhile
    "`queue list` shows the ids.": "the Queue table shows the ids.",
}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-]{0,99}$")


def safe_lora_name(name: str) -> str:
    """The LoRA's name as typed, refused when it could leave the LoRA folder or is not a plain file name."""
    name = (name or "").strip()
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not _NAME_RE.match(name) or ".." in name or name.endswith("."):
        raise ConfigError(f"LoRA name {name!r}: use letters, digits, space, '_', '-' or '.' (no folders, no '..').")
    return name


def in_tab_words(message: str) -> str:
    """A core message in the tab's words: its field labels for config keys, its controls for CLI flags."""
    for cli, tab in CLI_PHRASES.items():
        message = message.replace(cli, tab)
    return in_field_words(message, TAB_FIELDS)


def described(err: Exception) -> str:
    """An error for a status line: the core's message in the tab's words, else its type and text."""
    return in_tab_words(str(err)) if isinstance(err, LoraTrainerError) else f"{type(err).__name__}: {err}"


def advanced_fields() -> Dict[str, Dict[str, Any]]:
    """The config fields the advanced form is generated from (everything but the main fields)."""
    return {k: v for k, v in field_help().items() if k not in MAIN_FIELDS}


def device_defaults() -> Dict[str, Any]:
    """On a GPU the tab plans memory by default: the run is fitted to what is free once the WebUI's model is off."""
    import torch

    return {"memory_budget_gb": "auto"} if torch.cuda.is_available() else {}  # "off" turns it off


def preset_values(preset: str, low_vram: bool) -> Dict[str, Any]:
    """Each advanced option's value under a preset: what the tab's form shows, what the API's options go over."""
    values = {key: info["default"] for key, info in advanced_fields().items()}
    values.update(device_defaults())
    values.update(PRESETS.get(preset, {}))
    if low_vram:
        values.update(LOW_VRAM)
    return values


def form_to_config(name: str, folder: str, base_model: str, trigger_word: str, preset: str, low_vram: bool,
                   advanced: Mapping[str, Any], output_root: str | Path) -> TrainConfig:
    """Build the validated config of a run from the tab's fields (advanced: values that differ from the preset win)."""
    name = safe_lora_name(name)
    if not (folder or "").strip():
        raise ConfigError("Pick the image folder first.")
    baseline = preset_values(preset, low_vram)
    data: Dict[str, Any] = dict(baseline)
    for key, value in advanced.items():
        if key in MAIN_FIELDS:
            continue
        if key not in baseline or _differs(value, baseline[key]):
            data[key] = value  # an unknown key is refused by config_from_dict, naming the nearest valid one
    data.update(train_data_dir=str(folder).strip(), base_model=(base_model or "").strip(),
                trigger_word=(trigger_word or "").strip(), output_name=name,
                output_dir=str(Path(output_root) / name))
    return config_from_dict(data)


def _differs(value: Any, default: Any) -> bool:
    if isinstance(default, list) and isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
        if default and isinstance(default[0], float):
            value = [float(v) for v in value]
    if isinstance(default, float) and isinstance(value, (int, float)):
        return abs(float(value) - default) > 1e-12
    if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float):
        return int(value) != default or value != int(value)
    return value != default


class SessionCallbacks(Callbacks):
    """Collects what the tab shows; `extra` (a host's own callbacks, e.g. A1111's progress bar) is also told."""

    def __init__(self, extra: Optional[Callbacks] = None) -> None:
        self.extra = extra or Callbacks()
        self.losses: List[float] = []
        self.first_step = 1
        self.val_losses: List[Tuple[int, float]] = []  # (step, val_loss)
        self.status = "starting"
        self.sample: Optional[Path] = None
        self.step = 0
        self.total = 0
        self.plan = ""  # the memory plan's line, shown above the progress
        self.saved: Optional[Path] = None  # the finished LoRA, once written
        self.stop_event = threading.Event()

    def on_progress(self, step: int, total: int) -> None:
        self.step, self.total = step, total
        self.extra.on_progress(step, total)

    def on_status(self, message: str) -> None:
        self.status = message
        if message.startswith("memory plan"):
            self.plan = message
        self.extra.on_status(message)

    def on_loss(self, step: int, loss: float, lr: float) -> None:
        if not self.losses:
            self.first_step = step  # a resumed run starts after the resumed step
        self.losses.append(float(loss))
        self.extra.on_loss(step, loss, lr)

    def on_validation(self, step: int, val_loss: float) -> None:
        self.val_losses.append((step, float(val_loss)))
        self.extra.on_validation(step, val_loss)

    def plot(self) -> Any:
        """The loss plot as the tab shows it: loss, smoothed loss and the validation losses."""
        from ..evaluate.loss_plot import loss_image

        return loss_image(self.losses, val=self.val_losses, first_step=self.first_step)

    def on_sample(self, step: int, path: Path, image: Any = None) -> None:
        self.sample = Path(path)
        self.extra.on_sample(step, path, image)

    def on_saved(self, path: Path, final: bool) -> None:
        if final:
            self.status = f"saved {path}"
            self.saved = Path(path)
        self.extra.on_saved(path, final)

    def should_stop(self) -> bool:
        return self.stop_event.is_set() or self.extra.should_stop()


class TrainSession:
    """One training run in a background thread, polled by the tab (one run at a time per process)."""

    _lock = threading.Lock()
    current: Optional["TrainSession"] = None

    def __init__(self, run: Callable[[Callbacks], Any], extra: Optional[Callbacks] = None, task_id: str = "",
                 cfg: Any = None) -> None:
        self.callbacks = SessionCallbacks(extra)
        self.task_id = task_id  # the host's id for the run (A1111: its progress API's id_task), or ''
        self.cfg = cfg
        self.notice = ""  # what registering the LoRA with the host had to say (e.g. the key check)
        self._run = run
        self.result: Any = None
        self.error: Optional[str] = None
        self.exception: Optional[BaseException] = None  # what `error` says, for the queue to record the run by
        self.thread = threading.Thread(target=self._target, name="lora-trainer", daemon=True)

    def start(self, wait: bool = False) -> "TrainSession":
        """Start the run; one going already is an error, or with `wait` (the queue's runs) waited for."""
        while True:
            with TrainSession._lock:
                going = TrainSession.current
                if going is None or not going.running:
                    TrainSession.current = self
                    self.thread.start()  # under the lock: no other start sees this run as not running
                    return self
                if not wait:
                    raise LoraTrainerError("A training run is already going: stop it or wait for it to end.")
            going.wait()

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def stop(self) -> None:
        self.callbacks.stop_event.set()

    def wait(self, timeout: Optional[float] = None) -> None:
        self.thread.join(timeout)

    def _target(self) -> None:
        try:
            self.result = self._run(self.callbacks)
        except LoraTrainerError as e:
            self.error, self.exception = in_tab_words(str(e)), e
        except Exception as e:  # shown in the tab; the traceback goes to the console
            import traceback

            traceback.print_exc()
            self.error, self.exception = f"{type(e).__name__}: {e}", e

    def summary(self) -> str:
        cb = self.callbacks
        if self.error and cb.saved is not None and not self.running:  # the LoRA is there: not a failed run
            return f"Saved: LoRA {cb.saved}\nWarning: after saving: {self.error}"
        if self.error:
            return f"Error: {self.error}"
        if self.running:
            return (f"{cb.plan}\n" if cb.plan else "") + f"step {cb.step}/{cb.total} — {cb.status}"
        r = self.result
        if r is None:
            return cb.status
        if r.stopped:
            lines = [f"Stopped at step {r.steps}; the state in {r.state_dir} resumes it.",
                     skipped_line(getattr(r, "skipped", [])), report_line(r)]
            return "\n".join(line for line in lines if line)
        lines = [f"Done: {r.steps} steps. LoRA: {r.lora_path}", skipped_line(getattr(r, "skipped", [])), self.notice,
                 report_line(r)]
        return "\n".join(line for line in lines if line)


def report_page(output_dir: Any) -> Optional[Path]:
    """The run's report.html (training/record.py writes it at the end of every run), or None when there is none."""
    page = Path(output_dir) / "report.html" if output_dir else None
    return page if page is not None and page.is_file() else None


def report_line(result: Any) -> str:
    """Where the finished run's report page is: '' when it wrote none."""
    page = report_page(getattr(result, "output_dir", None))
    return f"Report: {page}" if page is not None else ""


def skipped_line(skipped: List[Tuple[str, str]], shown: int = 5) -> str:
    """The images a run left out, named: '' when none."""
    if not skipped:
        return ""
    names = "; ".join(f"{name} ({why})" for name, why in skipped[:shown])
    more = f"; and {len(skipped) - shown} more" if len(skipped) > shown else ""
    return f"Skipped {len(skipped)} image(s) training could not use: {names}{more}."


def start_run(backend: Any, cfg: Any, task_id: str = "", extra: Optional[Callbacks] = None,
              resume: Optional[str] = None, wait: bool = False) -> TrainSession:
    """Train `cfg` in the background through `backend` (a `blocks.Backend`), then register the finished LoRA with
    the host: the tab's Train, the API, and each queued run (`extra`: the queue's callbacks beside the host's;
    `resume`: the stopped run's folder; `wait`: start once the run going now has ended).

    Once the LoRA is saved the run is a success: a failure after that (the last sample grid, the host's
    card, list refresh or key check) is a warning under "Done", and the registration still happens."""
    task_id = task_id or backend.new_task_id()

    def run(callbacks: SessionCallbacks) -> Any:
        notes = []
        try:
            result = _train(backend, cfg, callbacks, task_id, resume)
        except Exception as err:
            if callbacks.saved is None:
                raise
            traceback.print_exc()
            result = _saved_result(callbacks)
            notes.append(f"Warning: after the LoRA was saved: {described(err)}")
        if result is not None and not result.stopped:
            try:
                notes.append(backend.after_training(cfg, result, session))
            except Exception as err:
                traceback.print_exc()
                notes.append(f"Warning: the LoRA is saved, but registering it failed: {described(err)}")
        session.notice = "\n".join(n for n in notes if n)
        return result

    host_callbacks = backend.progress_callbacks()
    heard = MultiCallbacks(host_callbacks, extra) if extra is not None else host_callbacks
    session = TrainSession(run, heard, task_id=task_id, cfg=cfg)
    return session.start(wait=wait)


def _train(backend: Any, cfg: Any, callbacks: Callbacks, task_id: str, resume: Optional[str]) -> Any:
    if resume is None:
        return backend.train(cfg, callbacks, task_id)
    if "resume" not in inspect.signature(backend.train).parameters:
        # a host's backend whose train() cannot continue a state: the run starts again, beside the stopped one
        callbacks.on_status(f"this host cannot resume {resume}: the run starts again")
        return backend.train(cfg, callbacks, task_id)
    return backend.train(cfg, callbacks, task_id, resume=resume)


def _saved_result(callbacks: SessionCallbacks) -> Any:
    """The result of a run that failed after writing its LoRA: the LoRA and the steps it had."""
    from ..training.loop import TrainResult

    return TrainResult(callbacks.saved, None, None, callbacks.step, False, list(callbacks.losses))
