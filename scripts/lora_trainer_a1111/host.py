"""The A1111 / Forge glue in one place: the core's HostInterface, runs as WebUI jobs (queue, progress bar,
Interrupt), and the tab's backend (selected checkpoint, LoRA card, key check, txt2img test grid, Send to txt2img).

Every `modules.*` access happens in a function, never at import: the tests put stand-in `modules`
objects in sys.modules. Forge keeps A1111's module names but not all of their behaviour; `is_forge()` picks.
"""

from __future__ import annotations

import json
import sys
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Tuple

from lora_trainer.callbacks import Callbacks, HostInterface
from lora_trainer.files import atomic_write_text, atomic_write_with
from lora_trainer.ui.blocks import Backend
from lora_trainer.ui.session import TEST_STRENGTHS

from .keycheck import module_names_from_state_dict, unmatched_keys

PREFERRED_WEIGHT = 0.8  # the card's weight, and the test picture whose parameters "Send to txt2img" takes
SD_VERSION = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}  # ui_edit_user_metadata.py's "sd version" choices


def _modules():
    from modules import devices, sd_models, shared  # noqa: F401 - the WebUI's own

    return shared, sd_models, devices


def is_forge() -> bool:
    """Forge imports its `modules_forge` package at start-up, before any extension."""
    return sys.modules.get("modules_forge") is not None


def loaded_model() -> Any:
    """The WebUI's model without loading one (`shared.sd_model` would load a checkpoint when none is)."""
    return _modules()[1].model_data.sd_model


class A1111Host(HostInterface):
    """Where LoRAs go (`--lora-dir`), freeing and restoring the WebUI's model, refreshing its LoRA list."""

    def __init__(self) -> None:
        self.moved: Any = None  # the model free_gpu put on the CPU, for restore_gpu to put back

    def lora_dir(self) -> Optional[Path]:
        shared, _, _ = _modules()
        configured = getattr(shared.cmd_opts, "lora_dir", None)  # added by extensions-builtin/Lora/preload.py
        if configured:
            return Path(configured)
        from modules import paths

        return Path(paths.models_path) / "Lora"

    def free_gpu(self) -> None:
        _, sd_models, devices = _modules()
        if is_forge():
            # Forge's send_model_to_cpu/device are no-ops: its memory manager unloads everything, and the
            # next generation loads the model again (processing.manage_model_and_prompt_cache).
            sd_models.unload_model_weights()
        else:
            model = loaded_model()
            if model is not None:
                sd_models.send_model_to_cpu(model)  # what Settings' "Unload SD checkpoint" does (lowvram aware)
                self.moved = model
        devices.torch_gc()

    def restore_gpu(self) -> None:
        _, sd_models, devices = _modules()
        if self.moved is not None:
            sd_models.send_model_to_device(self.moved)
            self.moved = None
        devices.torch_gc()

    def refresh_loras(self) -> None:
        networks = sys.modules.get("networks")  # extensions-builtin/Lora's module, loaded by the WebUI
        if networks is not None and hasattr(networks, "list_available_networks"):
            networks.list_available_networks()


class A1111Callbacks(Callbacks):
    """The WebUI's own progress (shared.state, read by /internal/progress and /sdapi/v1/progress) and Interrupt."""

    def __init__(self, what: str = "Training LoRA: step") -> None:
        self.what = what
        self.loss: Optional[float] = None

    def on_progress(self, step: int, total: int) -> None:
        state = _modules()[0].state
        state.job_count, state.job_no = total, step  # as the WebUI's textual-inversion trainer counts
        loss = f", loss {self.loss:.4f}" if self.loss is not None else ""
        state.textinfo = f"{self.what} {step}/{total}{loss}"

    def on_loss(self, step: int, loss: float, lr: float) -> None:
        self.loss = float(loss)

    def on_status(self, message: str) -> None:
        _modules()[0].state.textinfo = message

    def on_sample(self, step: int, path: Path, image: Any = None) -> None:
        from PIL import Image

        state = _modules()[0].state
        if hasattr(state, "assign_current_image"):  # the live preview of /sdapi/v1/progress
            state.assign_current_image(image if image is not None else Image.open(path).convert("RGB"))

    def should_stop(self) -> bool:
        state = _modules()[0].state
        return bool(getattr(state, "interrupted", False) or getattr(state, "stopping_generation", False))


@contextmanager
def webui_job(task_id: str) -> Iterator[None]:
    """Run as one WebUI job, as call_queue.wrap_gradio_gpu_call does: queued behind txt2img/img2img
    (queue_lock), shown by the WebUI's progress API under `task_id`, flags reset for the next job."""
    from modules import call_queue, progress

    state = _modules()[0].state
    progress.add_task_to_queue(task_id)
    with call_queue.queue_lock:
        state.begin(job=task_id)
        progress.start_task(task_id)
        try:
            yield
        finally:
            progress.finish_task(task_id)
            state.end()
            state.interrupted = state.skipped = state.stopping_generation = False


def on_main_thread(fn: Callable[[], Any]) -> Any:
    """Forge runs every generation on its one worker thread (modules_forge.main_thread); A1111 on the caller's."""
    if is_forge():
        from modules_forge import main_thread

        return main_thread.run_and_wait_result(fn)
    return fn()


def write_card(lora_path: Path, trigger_word: str, family: str, preview: Any = None, description: str = "") -> Path:
    """The extra-networks card: `<name>.json` (ui_edit_user_metadata keys) and `<name>.preview.png`."""
    lora_path = Path(lora_path)
    card = {"description": description, "sd version": SD_VERSION.get(family, "Unknown"),
            "activation text": trigger_word, "preferred weight": PREFERRED_WEIGHT, "negative text": "", "notes": ""}
    path = atomic_write_text(lora_path.with_suffix(".json"), json.dumps(card, indent=4))
    if preview is not None:
        from PIL import Image

        image = preview if isinstance(preview, Image.Image) else Image.open(preview)
        atomic_write_with(lora_path.with_suffix(".preview.png"), lambda tmp: image.save(tmp, format="PNG"))
    return path


def host_unmatched_keys(tensors: dict) -> Optional[List[str]]:
    """The file's modules the running WebUI would not apply; None when no model is loaded to check against."""
    model = loaded_model()
    if is_forge():
        forge_objects = getattr(model, "forge_objects", None)  # a FakeInitialModel before the first generation
        if forge_objects is None:
            return None
        from backend.patcher.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet

        rest = dict(tensors)  # Forge's own loader: what neither the UNet nor the CLIP key map takes is dropped
        for keys in (model_lora_keys_unet(forge_objects.unet.model, {}),
                     model_lora_keys_clip(forge_objects.clip.cond_stage_model, {})):
            _, rest = load_lora(rest, keys)
        return sorted({k.split(".", 1)[0] for k in rest})
    if model is None:
        return None
    known = set(getattr(model, "network_layer_mapping", {}) or {})  # set by the Lora extension at model load
    if not known:
        known = module_names_from_state_dict(model.state_dict().keys())
    convert = getattr(sys.modules.get("networks"), "convert_diffusers_name_to_compvis", None)
    if convert is not None:
        is_sd2 = bool(getattr(model, "is_sd2", False))
        return unmatched_keys(tensors, known, lambda name: convert(name, is_sd2))
    return unmatched_keys(tensors, known)


def check_against_host(lora_path: Path, known: Optional[set] = None) -> str:
    """'' when the WebUI would apply every key of the file, else a message to show in the tab.

    `known` (tests): A1111 module names to check against instead of the loaded model's."""
    from lora_trainer.export import read_lora

    tensors, _ = read_lora(Path(lora_path))
    missing = unmatched_keys(tensors, known) if known is not None else host_unmatched_keys(tensors)
    if missing is None:
        return "(Not checked against the WebUI's LoRA loader: no model is loaded yet.)"
    if not missing:
        return ""
    return (f"Error: the WebUI would ignore {len(missing)} layer(s) of this LoRA (e.g. {missing[0]}): "
            "it would load with little or no effect. Please report this with the model you trained on.")


class A1111Backend(Backend):
    """The tab inside the WebUI: its checkpoints, its job queue and GPU, its LoRA folder, its txt2img."""

    title = "Train LoRA"
    refresh_js = "() => { if (window.loraTrainerRefreshNetworks) loraTrainerRefreshNetworks(); }"
    job_js = "loraTrainerStartJob"

    def __init__(self, host: Optional[A1111Host] = None) -> None:
        self._host = host or A1111Host()

    def default_base_model(self) -> str:
        """The checkpoint selected in the WebUI (its title, as in the checkpoint dropdown); loads nothing."""
        try:
            info = _modules()[1].select_checkpoint()
        except FileNotFoundError:  # A1111 without any checkpoint (Forge returns None)
            return ""
        return str(info.title) if info is not None else ""

    def base_model_choices(self) -> List[str]:
        return list(_modules()[1].checkpoint_tiles())

    def resolve_base_model(self, value: str) -> str:
        # The file, not the loaded model's weights: those may have a LoRA merged in (networks.py patches them).
        info = _modules()[1].checkpoint_aliases.get(value)
        return str(info.filename) if info is not None else value

    def output_root(self) -> Path:
        from modules import paths

        configured = getattr(_modules()[0].opts, "lora_trainer_output_dir", "")  # Settings → LoRA Trainer
        return Path(configured) if configured else Path(paths.data_path) / "outputs" / "lora_trainer"

    def host(self) -> A1111Host:
        return self._host

    def progress_callbacks(self) -> Callbacks:
        return A1111Callbacks()

    def new_task_id(self) -> str:
        from modules import progress

        return progress.create_task_id("lora_trainer")

    def caption(self, folder: Path, trigger: str, callbacks: Optional[Callbacks] = None, task_id: str = "") -> int:
        # The captioner uses the GPU too: a WebUI job, with the WebUI's model off the GPU meanwhile.
        with webui_job(task_id or self.new_task_id()):
            self._host.free_gpu()
            try:
                return super().caption(folder, trigger, callbacks or A1111Callbacks("Captioning: image"), task_id)
            finally:
                self._host.restore_gpu()

    def train(self, cfg: Any, callbacks: Callbacks, task_id: str = "") -> Any:
        from lora_trainer.train import train

        callbacks.on_status("waiting for the WebUI's current job to finish")
        with webui_job(task_id or self.new_task_id()):
            return train(cfg, callbacks=callbacks, host=self._host)

    def after_training(self, cfg: Any, result: Any, session: Any) -> str:
        from lora_trainer.export import read_lora

        _, meta = read_lora(Path(result.lora_path))
        version = str(meta.get("ss_base_model_version", ""))
        family = "sdxl" if version.startswith("sdxl") else "sd2" if version.startswith("sd_v2") else "sd1"
        preview = session.callbacks.sample or _first_image(cfg.train_data_dir)  # no sample prompts: a training image
        write_card(result.lora_path, cfg.trigger_word, family, preview,
                   f"Trained with lora-scripts on {Path(cfg.base_model).name}")
        self._host.refresh_loras()
        return check_against_host(result.lora_path)

    def test_grid(self, cfg: Any, lora_path: Path, prompt: str, seed: int, task_id: str = "") -> Tuple[Any, str]:
        from lora_trainer.sample import label_grid

        prompt = prompt or cfg.trigger_word
        with webui_job(task_id or self.new_task_id()):
            try:
                pictures, infotext = on_main_thread(
                    lambda: txt2img_pictures(Path(lora_path).stem, prompt, seed, cfg.resolution))
            finally:
                try:
                    on_main_thread(release_test_memory)
                except Exception as err:  # memory left to the WebUI must never cost the user the grid
                    print(f"[LoRA Trainer] could not release the Test grid's memory: {type(err).__name__}: {err}",
                          flush=True)
        grid = label_grid([pictures], [f"strength {w:g}" for w in TEST_STRENGTHS], [prompt], seed)
        return grid, infotext

    def add_send_buttons(self, gr: Any, infotext: Any) -> None:
        try:
            from modules import infotext_utils as paste  # A1111 1.8+ and Forge
        except ImportError:
            from modules import generation_parameters_copypaste as paste  # its name before 1.8
        button = gr.Button("Send to txt2img", elem_id="lora_trainer_send_to_txt2img")
        # Bound by the WebUI after every tab is built (ui.py: connect_paste_params_buttons).
        paste.register_paste_params_button(paste.ParamBinding(paste_button=button, tabname="txt2img",
                                                              source_text_component=infotext))


def _first_image(folder: str) -> Optional[Path]:
    from lora_trainer.images import list_images

    images = list_images(Path(folder)) if Path(folder).is_dir() else []
    return images[0] if images else None


def txt2img_pictures(lora_name: str, prompt: str, seed: int, size: int, steps: int = 20) -> Tuple[List[Any], str]:
    """`prompt` at each test strength through the WebUI's own txt2img (fixed seed, as the textual-inversion
    trainer renders its previews); returns the pictures and the infotext of the PREFERRED_WEIGHT one."""
    from modules import processing

    state = _modules()[0].state
    state.job_count = len(TEST_STRENGTHS)  # process_images sets it only while it is -1; one job per picture
    pictures, infotext = [], ""
    for w in TEST_STRENGTHS:
        text = f"{prompt} <lora:{lora_name}:{w:g}>" if w else prompt
        p = processing.StableDiffusionProcessingTxt2Img(prompt=text, seed=seed, steps=steps, width=size, height=size,
                                                        cfg_scale=7, sampler_name="Euler a", do_not_save_grid=True,
                                                        do_not_save_samples=True)
        with closing(p):
            processed = processing.process_images(p)
        pictures.append(processed.images[0])
        if w == PREFERRED_WEIGHT:
            infotext = with_prompt(processed.infotexts[0], text)
    return pictures, infotext


def release_test_memory() -> None:
    """Hand back what the WebUI keeps because of the Test generations (read in A1111 1.10.1 and Forge's code).

    A1111's Lora extension keeps a CPU copy of every weight a LoRA touched (`network_weights_backup`, about the
    size of the UNet and text encoder in fp16) until a checkpoint is loaded again, and the last conds in class
    attributes of `processing`. The weights are restored from those copies first, so no LoRA stays merged. Forge
    keeps the last five LoRA files' tensors in an lru_cache. Then the freed pages go back to the system.
    """
    import torch

    from lora_trainer.memory import release

    networks = sys.modules.get("networks")
    if networks is not None and is_forge():
        getattr(getattr(networks, "load_lora_state_dict", None), "cache_clear", lambda: None)()
    elif networks is not None:
        restore = getattr(networks, "network_restore_weights_from_backup", None)
        reset = getattr(networks, "network_reset_cached_weight", None)
        model = loaded_model()
        if model is not None and restore is not None and reset is not None:
            with torch.no_grad():  # A1111 restores inside a generation; its weights require grad outside one
                for layer in (getattr(model, "network_layer_mapping", None) or {}).values():
                    restore(layer)  # no-op for a layer without backups
                    reset(layer)    # backups dropped; the next <lora:...> re-applies from the restored weights
        for cache in (getattr(networks, "loaded_networks", None), getattr(networks, "networks_in_memory", None)):
            if cache is not None:
                cache.clear()
    processing = sys.modules.get("modules.processing")
    for cls_name in ("StableDiffusionProcessing", "StableDiffusionProcessingTxt2Img"):
        cls = getattr(processing, cls_name, None)
        for attr in ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc"):
            cache = getattr(cls, attr, None)
            if isinstance(cache, list):
                cache[:] = [None] * len(cache)  # in place: every instance holds the same list
    state = _modules()[0].state
    for attr in ("current_latent", "current_image"):
        if hasattr(state, attr):
            setattr(state, attr, None)
    release()


def with_prompt(infotext: str, prompt: str) -> str:
    """`infotext` with `prompt` as its prompt. The WebUI writes the prompt without its <lora:…> tags here (seen
    in A1111 1.10.1: only "Lora hashes" names the LoRA), and "Send to txt2img" must bring the tag along."""
    lines = infotext.split("\n")
    rest = [line for i, line in enumerate(lines) if i == len(lines) - 1 or line.startswith("Negative prompt:")]
    return "\n".join([prompt, *rest])
