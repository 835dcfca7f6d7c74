"""The Train LoRA tab as one gradio Blocks, built the same under gradio 3.41 (A1111 1.10) and 4.x (Forge).

Only plain components and handlers that return a value per output are used (both majors accept
that); the one keyword that differs (`_js` in 3.x, `js` in 4.x) goes through `_js_kwargs`.
gradio is imported inside `build_blocks`, so the core stays importable without it.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ContextManager, Dict, List, Optional, Tuple

from ..callbacks import Callbacks, HostInterface
from ..errors import LoraTrainerError
from ..evaluate.loss_plot import loss_image
from . import dataset_panel as panel
from .merging import add_merge_panel
from .queue_panel import add_queue_panel
from .session import (PRESET_FIELDS, PRESETS, TEST_STRENGTHS, TrainSession, advanced_fields, form_to_config,
                      in_tab_words, preset_values, start_run)
from .strengths import run_test
from .uploads import UPLOAD_TYPES

POLL_SECONDS = 1.0


class Backend:
    """What a host gives the tab. The defaults are the standalone UI's (base model from a path)."""

    title = "Train LoRA"
    refresh_js: Optional[str] = None  # client-side code run after a run ends (A1111: refresh the LoRA list)
    # Client-side code run when Caption, Train or Test is clicked: it gets the handler's inputs and returns them with a
    # task id first (A1111: starts the WebUI's own progress bar for that id). None: no task id.
    job_js: Optional[str] = None
    captioner_model: Optional[str] = None  # the captioner's (and the strength scorer's) CoCa model; None: the default

    def default_base_model(self) -> str:
        return ""

    def base_model_choices(self) -> List[str]:
        return []

    def resolve_base_model(self, value: str) -> str:
        """The base model's path from what the form holds (A1111: a checkpoint title)."""
        return value

    def output_root(self) -> Path:
        return Path("output")

    def host(self) -> Optional[HostInterface]:
        return None

    def progress_callbacks(self) -> Optional[Callbacks]:
        return None

    def new_task_id(self) -> str:
        """An id for a run started without one from the page (API calls); '' where the host has no queue."""
        return ""

    def captioner_weights_dir(self) -> Path:
        """The folder the "Captioner weights" field lists and the tab tells users to put weights in
        (A1111: models/lora_trainer/captioner; standalone: the lora_trainer cache's captioner folder)."""
        from ..data.captions.weights import weights_dir

        return weights_dir()

    def caption(self, folder: Path, trigger: str, callbacks: Optional[Callbacks] = None, task_id: str = "",
                weights: str = "") -> int:
        """Caption the folder's images that have none (trigger word first) with the captioner weights `weights`
        (a file, or an open_clip tag; '' = the default); returns how many got one."""
        from ..data.captions import DEFAULT_PRETRAINED, CaptionOptions, caption_folder

        options = CaptionOptions(trigger=trigger, pretrained=weights or DEFAULT_PRETRAINED)
        if self.captioner_model:
            options.model = self.captioner_model
        results = caption_folder(folder, options=options, callbacks=callbacks)
        return sum(1 for r in results if r.status == "new")

    def train(self, cfg: Any, callbacks: Callbacks, task_id: str = "", resume: Optional[str] = None) -> Any:
        """Train `cfg` (`resume`: a run folder whose saved state it continues, as the queue's stopped runs)."""
        from ..training.loop import train

        return train(cfg, callbacks=callbacks, host=self.host(), resume=resume)

    def after_training(self, cfg: Any, result: Any, session: TrainSession) -> str:
        """Register the finished LoRA with the host; returns warnings to show under "Done", or ''.
        The LoRA is saved by then: nothing here may turn the run into an error."""
        return ""

    def test_job(self, task_id: str) -> ContextManager[Any]:
        """What Test runs inside, rendering and scoring (A1111: one WebUI job, its progress bar under `task_id`)."""
        return nullcontext()

    def test_pictures(self, cfg: Any, lora_path: Path, prompt: str, seed: int) -> Tuple[List[Any], List[str]]:
        """`prompt` at each of TEST_STRENGTHS from `seed`: (the pictures, the infotext of each for "Send to txt2img",
        '' where the host has none). Whatever the host kept for them is handed back before this returns."""
        raise LoraTrainerError("This host cannot render a test grid.")

    def scoring_memory(self) -> ContextManager[Any]:
        """Held while the strength scorer's model is loaded (A1111: the WebUI's model off the GPU meanwhile)."""
        return nullcontext()

    def test_grid_file(self, lora_path: Path) -> Optional[Path]:
        """Where Test also saves its grid, or None."""
        return None

    def after_test(self, cfg: Any, lora_path: Path, best: Optional[float]) -> str:
        """Write the best strength Test found (None: not scored) where the host keeps a LoRA's settings; returns
        what to say in the status. Here: the file's `modelspec.usage_hint`, its tensors untouched."""
        if best is None:
            return ""
        from ..adapters.export import write_usage_weight

        hint = write_usage_weight(lora_path, best, cfg.trigger_word)
        return f"strength {best:g} written into the usage hint of {Path(lora_path).name}: {hint}"

    def add_send_buttons(self, gr: Any, infotext: Any) -> None:
        """Buttons that take the test's generation parameters to the host's own tabs (A1111: Send to txt2img)."""

    # Client-side code run after Merge into checkpoint (A1111/Forge: press the checkpoint list's refresh button).
    checkpoints_js: Optional[str] = None

    def checkpoint_dir(self, base_path: Path) -> Path:
        """Where Merge into checkpoint writes (A1111/Forge: the WebUI's checkpoint folder); here: beside the base."""
        return Path(base_path).parent

    def preferred_strength(self, lora_path: Path) -> Optional[float]:
        """The LoRA's strength as the host keeps it, or None. Here: the weight in the file's usage hint."""
        from .merging import usage_hint_weight

        return usage_hint_weight(lora_path)

    def after_merge(self, checkpoint: Path) -> str:
        """Make the host list a checkpoint Merge into checkpoint wrote; returns what to add to the status, or ''."""
        return ""


def _js_kwargs(gr: Any, js: Optional[str]) -> Dict[str, str]:
    if not js:
        return {}
    return {"js": js} if int(gr.__version__.split(".")[0]) >= 4 else {"_js": js}


def _field_component(gr: Any, name: str, info: Dict[str, Any], value: Any) -> Any:
    common = dict(label=name, info=info.get("help", ""), elem_id=f"lora_trainer_opt_{name}")
    if info.get("choices"):
        return gr.Dropdown(choices=list(info["choices"]), value=value, **common)
    if info["type"] == "bool":
        return gr.Checkbox(value=value, **common)
    if info["type"] in ("int", "float"):
        return gr.Number(value=value, precision=0 if info["type"] == "int" else None, **common)
    return gr.Textbox(value=_shown(value), **common)


def _shown(value: Any) -> Any:
    """A config value as its form field holds it (lists as comma-separated text, mappings as key=value pairs)."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return ", ".join(map(str, value)) if isinstance(value, list) else value


def build_blocks(backend: Backend) -> Any:
    """The tab's Blocks; A1111 and Forge return it from on_ui_tabs, the standalone UI launches it."""
    import gradio as gr

    from ..data.doctor import TABLE_COLUMNS

    fields = advanced_fields()
    with gr.Blocks(analytics_enabled=False, title=backend.title) as blocks:
        with gr.Row():
            folder = gr.Textbox(label="Image folder", elem_id="lora_trainer_folder")
            load = gr.Button("Load images", elem_id="lora_trainer_load")
        # The browser may be on another machine than the WebUI: its files are copied into the Image folder.
        upload = gr.File(label="Add images (image files, caption .txt files or a .zip: copied into the Image folder)",
                         file_count="multiple", file_types=UPLOAD_TYPES, height=120, elem_id="lora_trainer_add_images")
        gallery = gr.Gallery(label="Images", columns=6, height=220, elem_id="lora_trainer_gallery")
        findings = gr.Dataframe(headers=list(TABLE_COLUMNS), datatype=["str"] * len(TABLE_COLUMNS), type="array",
                                interactive=False, wrap=True, elem_id="lora_trainer_findings",
                                label="Findings: what training would skip, crop or misread, and the fix")
        table = gr.Dataframe(headers=["image", "caption"], datatype=["str", "str"], type="array",
                             interactive=True, label="Captions (edit, then Save captions)", elem_id="lora_trainer_captions")
        with gr.Row():
            trigger = gr.Textbox(label="Trigger word", elem_id="lora_trainer_trigger", scale=1)
            weights = gr.Dropdown(label=panel.WEIGHTS_FIELD, choices=panel.weight_choices(backend),
                                  value=panel.AUTO_WEIGHTS, allow_custom_value=True, elem_id="lora_trainer_weights",
                                  scale=2, info=f"The captioner's coca_ViT-L-14 weights: put the file in "
                                                f"{backend.captioner_weights_dir()} and press Refresh, or type its "
                                                f"path. {panel.AUTO_WEIGHTS}: the default ones, if downloaded before.")
            weights_refresh = gr.Button("Refresh", size="sm", min_width=80, scale=0,
                                        elem_id="lora_trainer_weights_refresh")
        with gr.Row():
            caption_btn = gr.Button("Caption empty ones", elem_id="lora_trainer_caption")
            save_btn = gr.Button("Save captions", elem_id="lora_trainer_save_captions")
        with gr.Row():
            name = gr.Textbox(label="LoRA name", elem_id="lora_trainer_name")
            # A callable value is re-read at every page load: the checkpoint selected in the WebUI right now.
            base = gr.Dropdown(label="Base model", choices=backend.base_model_choices(), value=backend.default_base_model,
                               allow_custom_value=True, elem_id="lora_trainer_base")
            preset = gr.Dropdown(choices=list(PRESETS), value="style", label="Preset", elem_id="lora_trainer_preset")
            low_vram = gr.Checkbox(label="Low VRAM", value=False, elem_id="lora_trainer_low_vram")
        shown = preset_values(preset.value, low_vram.value)
        with gr.Accordion("Advanced options", open=False, elem_id="lora_trainer_advanced"):
            adv = {key: _field_component(gr, key, info, shown[key]) for key, info in fields.items()}
        synced = [key for key in fields if key in PRESET_FIELDS]  # they follow the preset: the form shows the run
        with gr.Row():
            task_id = gr.Textbox(visible=False, elem_id="lora_trainer_task_id")  # filled by job_js
            train_btn = gr.Button("Train", variant="primary", elem_id="lora_trainer_train")
            queue_btn = gr.Button("Queue", elem_id="lora_trainer_queue")  # trains after the runs before it
            stop_btn = gr.Button("Interrupt", elem_id="lora_trainer_interrupt")
        status = gr.Textbox(label="Status", interactive=False, elem_id="lora_trainer_status")
        with gr.Row():
            plot = gr.Image(label="Loss", type="pil", interactive=False, elem_id="lora_trainer_loss")
            sample = gr.Image(label="Samples", type="filepath", interactive=False, elem_id="lora_trainer_sample")
        form = [folder, trigger, name, base, preset, low_vram, *adv.values()]  # what Train and Queue build a run from

        def run_config(folder_value, trigger_value, name_value, base_value, preset_value, low, *adv_values):
            base_model = backend.resolve_base_model(base_value or backend.default_base_model())
            return form_to_config(name_value, folder_value, base_model, trigger_value, preset_value, low,
                                  dict(zip(fields, adv_values)), backend.output_root())

        queue_events = add_queue_panel(gr, backend, queue_btn, form, run_config, [status, plot, sample],
                                       lambda cb: cb.plot() if cb is not None else loss_image([]))
        with gr.Row():
            prompt = gr.Textbox(label="Test prompt", elem_id="lora_trainer_test_prompt")
            seed = gr.Number(label="Seed", value=1, precision=0)
            test_btn = gr.Button("Test", elem_id="lora_trainer_test")
        strengths = ", ".join(f"{s:g}" for s in TEST_STRENGTHS)
        grid = gr.Image(label=f"Test grid (strengths {strengths}; scores under each column)", type="pil",
                        interactive=False, elem_id="lora_trainer_grid")
        infotext = gr.Textbox(visible=False, elem_id="lora_trainer_infotext")  # the test's generation parameters
        with gr.Row():
            backend.add_send_buttons(gr, infotext)
        merge = add_merge_panel(gr, backend, base, lambda js: _js_kwargs(gr, js))

        settings = [trigger, preset, low_vram, *adv.values()]  # what the doctor checks against, as a run gets them
        shown_dataset = [gallery, table, findings, status]

        def on_load(folder_value, trigger_value, preset_value, low, *adv_values):
            return panel.look_at(folder_value, trigger_value, preset_value, low, dict(zip(fields, adv_values)))

        def on_add(files, folder_value, trigger_value, preset_value, low, *adv_values):
            advanced = dict(zip(fields, adv_values))
            return (*panel.add_images(files, folder_value, trigger_value, preset_value, low, advanced), None)

        def on_save(folder_value, rows):
            return panel.save_captions(folder_value, rows)

        def on_caption(task, folder_value, weights_value, trigger_value, preset_value, low, *adv_values):
            return panel.caption_empty(backend, task, folder_value, trigger_value, weights_value, preset_value, low,
                                       dict(zip(fields, adv_values)))

        def on_weights_refresh():
            return gr.update(choices=panel.weight_choices(backend))

        def on_train(task, *form_values):
            try:
                session = start_run(backend, run_config(*form_values), task)
            except LoraTrainerError as e:
                yield in_tab_words(str(e)), loss_image([]), None
                return
            while session.running:
                time.sleep(POLL_SECONDS)
                cb = session.callbacks
                yield session.summary(), cb.plot(), str(cb.sample) if cb.sample else None
            cb = session.callbacks
            yield session.summary(), cb.plot(), str(cb.sample) if cb.sample else None

        def on_preset(preset_value, low):
            values = preset_values(preset_value, low)
            return [gr.update(value=_shown(values[key])) for key in synced]

        def on_stop():
            session = TrainSession.current  # the tab's run or one started through the API
            if session is not None and session.running:
                session.stop()
                return "stopping after this step…"
            return "nothing is training"

        def on_test(task, prompt_value, seed_value, weights_value):
            session = TrainSession.current
            if session is None or session.result is None or session.result.lora_path is None:
                return None, "", "Train a LoRA first."
            try:
                tried = run_test(backend, session.cfg, session.result.lora_path, prompt_value, int(seed_value or 1),
                                 task or backend.new_task_id(), weights_value)
            except LoraTrainerError as e:
                return None, "", in_tab_words(str(e))
            return tried.grid, tried.infotext, tried.status

        load.click(on_load, [folder, *settings], shown_dataset)
        upload.upload(on_add, [upload, folder, *settings], [*shown_dataset, upload])
        save_btn.click(on_save, [folder, table], [status])
        caption_btn.click(on_caption, [task_id, folder, weights, *settings], shown_dataset,
                          **_js_kwargs(gr, backend.job_js))
        weights_refresh.click(on_weights_refresh, None, [weights])
        trained = train_btn.click(on_train, [task_id, *form], [status, plot, sample], **_js_kwargs(gr, backend.job_js))
        stop_btn.click(on_stop, None, [status])
        for control in (preset, low_vram):
            control.change(on_preset, [preset, low_vram], [adv[key] for key in synced])
        tested = test_btn.click(on_test, [task_id, prompt, seed, weights], [grid, infotext, status],
                                **_js_kwargs(gr, backend.job_js))
        for event in (trained, tested, *queue_events):  # the host's LoRA list, then the merge fields for the new LoRA
            event.then(None, None, None, **_js_kwargs(gr, backend.refresh_js)).then(
                merge.refresh_fields, [base, merge.name], [merge.strength, merge.name])
    return blocks
