"""The A1111 / Forge glue: the core's HostInterface, the WebUI's progress bar and Interrupt, and the tab's
backend (selected checkpoint, captioner weights folder, LoRA card, key check, txt2img test pictures and where
Test's best strength goes, Send to txt2img, the checkpoint folder and list for Merge into checkpoint). The WebUI's
modules are read at call time (`webui`); the card is `card`, the pictures `testgrid`, the checkpoint side of a merge
`merging`; labelling and scoring the pictures and the merge itself are the tab's own (`lora_trainer.ui`).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple

from lora_trainer.callbacks import Callbacks, HostInterface
from lora_trainer.ui.blocks import Backend

from . import merging
from .card import lora_family, preferred_weight, preview_image, set_preferred_weight, write_card
from .keycheck import module_names_from_state_dict, unmatched_keys
from .testgrid import release_test_memory, txt2img_pictures
from .webui import forge_flux_config, webui_modules, is_forge, loaded_model, on_main_thread, webui_job

__all__ = ["A1111Backend", "A1111Callbacks", "A1111Host", "check_against_host", "is_forge", "webui_job"]


class A1111Host(HostInterface):
    """Where LoRAs go (`--lora-dir`), freeing and restoring the WebUI's model, refreshing its LoRA list."""

    def __init__(self) -> None:
        self.moved: Any = None  # the model free_gpu put on the CPU, for restore_gpu to put back
        self.problems: List[str] = []  # what restore_gpu could not do, for the tab to show as warnings
        self.refresh_problem = ""  # why the last refresh of the LoRA list failed, or ''

    def lora_dir(self) -> Optional[Path]:
        shared, _, _ = webui_modules()
        configured = getattr(shared.cmd_opts, "lora_dir", None)  # added by extensions-builtin/Lora/preload.py
        if configured:
            return Path(configured)
        from modules import paths

        return Path(paths.models_path) / "Lora"

    def free_gpu(self) -> None:
        self.problems = []  # a new run (or captioning) starts
        _, sd_models, devices = webui_modules()
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
        # Called by the core after every run, a finished one too: a failure here is reported, never raised.
        _, sd_models, devices = webui_modules()
        moved, self.moved = self.moved, None
        try:
            if moved is not None:
                sd_models.send_model_to_device(moved)
            devices.torch_gc()
        except Exception as err:
            self.problems.append(_warning("the WebUI's model could not be put back on the GPU (the next generation "
                                          "loads it)", err))

    def refresh_loras(self) -> None:
        # The core calls this right after publishing the LoRA: a failure must not cost the run.
        networks = sys.modules.get("networks")  # extensions-builtin/Lora's module, loaded by the WebUI
        try:
            if networks is not None and hasattr(networks, "list_available_networks"):
                networks.list_available_networks()
            self.refresh_problem = ""
        except Exception as err:
            self.refresh_problem = _warning("the LoRA list was not refreshed (press the Lora tab's refresh)", err)

    def take_problems(self) -> List[str]:
        problems, self.problems = self.problems, []
        return problems


class A1111Callbacks(Callbacks):
    """The WebUI's own progress (shared.state, read by /internal/progress and /sdapi/v1/progress) and Interrupt."""

    def __init__(self, what: str = "Training LoRA: step") -> None:
        self.what = what
        self.loss: Optional[float] = None

    def on_progress(self, step: int, total: int) -> None:
        state = webui_modules()[0].state
        state.job_count, state.job_no = total, step  # as the WebUI's textual-inversion trainer counts
        loss = f", loss {self.loss:.4f}" if self.loss is not None else ""
        state.textinfo = f"{self.what} {step}/{total}{loss}"

    def on_loss(self, step: int, loss: float, lr: float) -> None:
        self.loss = float(loss)

    def on_status(self, message: str) -> None:
        webui_modules()[0].state.textinfo = message

    def on_sample(self, step: int, path: Path, image: Any = None) -> None:
        from PIL import Image

        state = webui_modules()[0].state
        if hasattr(state, "assign_current_image"):  # the live preview of /sdapi/v1/progress
            state.assign_current_image(image if image is not None else Image.open(path).convert("RGB"))

    def should_stop(self) -> bool:
        state = webui_modules()[0].state
        return bool(getattr(state, "interrupted", False) or getattr(state, "stopping_generation", False))


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
    from lora_trainer.adapters.export import read_lora

    tensors, _ = read_lora(Path(lora_path))
    missing = unmatched_keys(tensors, known) if known is not None else host_unmatched_keys(tensors)
    if missing is None:
        return "(Not checked against the WebUI's LoRA loader: no model is loaded yet.)"
    if not missing:
        return ""
    return (f"Warning: the WebUI would ignore {len(missing)} layer(s) of this LoRA (e.g. {missing[0]}): "
            "it would load with little or no effect. Please report this with the model you trained on.")


def _warning(what: str, err: Exception) -> str:
    import traceback

    traceback.print_exc()  # the details go to the console, the tab gets one line
    return f"Warning: {what}: {type(err).__name__}: {err}"


class A1111Backend(Backend):
    """The tab inside the WebUI: its checkpoints, its job queue and GPU, its LoRA folder, its txt2img."""

    title = "Train LoRA"
    refresh_js = "() => { if (window.loraTrainerRefreshNetworks) loraTrainerRefreshNetworks(); }"
    job_js = "loraTrainerStartJob"
    checkpoints_js = "() => { if (window.loraTrainerRefreshCheckpoints) loraTrainerRefreshCheckpoints(); }"

    def __init__(self, host: Optional[A1111Host] = None) -> None:
        self._host = host or A1111Host()

    def default_base_model(self) -> str:
        """The checkpoint selected in the WebUI (its title, as in the checkpoint dropdown); loads nothing."""
        try:
            info = webui_modules()[1].select_checkpoint()
        except FileNotFoundError:  # A1111 without any checkpoint (Forge returns None)
            return ""
        return str(info.title) if info is not None else ""

    def base_model_choices(self) -> List[str]:
        return list(webui_modules()[1].checkpoint_tiles())

    def resolve_base_model(self, value: str) -> str:
        # The file, not the loaded model's weights: those may have a LoRA merged in (networks.py patches them).
        info = webui_modules()[1].checkpoint_aliases.get(value)
        return str(info.filename) if info is not None else value

    def output_root(self) -> Path:
        from modules import paths

        configured = getattr(webui_modules()[0].opts, "lora_trainer_output_dir", "")  # Settings → LoRA Trainer
        return Path(configured) if configured else Path(paths.data_path) / "outputs" / "lora_trainer"

    def host(self) -> A1111Host:
        return self._host

    def progress_callbacks(self) -> Callbacks:
        return A1111Callbacks()

    def new_task_id(self) -> str:
        from modules import progress

        return progress.create_task_id("lora_trainer")

    def captioner_weights_dir(self) -> Path:
        from modules import paths

        return Path(paths.models_path) / "lora_trainer" / "captioner"

    def caption(self, folder: Path, trigger: str, callbacks: Optional[Callbacks] = None, task_id: str = "",
                weights: str = "") -> int:
        # The captioner uses the GPU too: a WebUI job, with the WebUI's model off the GPU meanwhile.
        with webui_job(task_id or self.new_task_id()):
            self._host.free_gpu()
            try:
                return super().caption(folder, trigger, callbacks or A1111Callbacks("Captioning: image"), task_id,
                                       weights)
            finally:
                self._host.restore_gpu()

    def train(self, cfg: Any, callbacks: Callbacks, task_id: str = "", resume: Optional[str] = None) -> Any:
        """`resume`: a stopped run's folder (the tab's queue resumes the run it stopped)."""
        from lora_trainer.errors import ConfigError
        from lora_trainer.model.flux import is_flux_file
        from lora_trainer.training.loop import train

        if is_flux_file(cfg.base_model) and not is_forge():  # said before the WebUI's job queue is waited for
            raise ConfigError(f"{Path(cfg.base_model).name} is a Flux.1 model: AUTOMATIC1111 1.10 cannot run Flux. "
                              "Use Forge or ComfyUI for Flux, or pick an SD 1.x, SD 2.x or SDXL checkpoint.")
        if is_flux_file(cfg.base_model):
            cfg = forge_flux_config(cfg)
        callbacks.on_status("waiting for the WebUI's current job to finish")
        with webui_job(task_id or self.new_task_id()):
            return train(cfg, callbacks=callbacks, host=self._host, resume=resume)

    def after_training(self, cfg: Any, result: Any, session: Any) -> str:
        """The card and its preview, the LoRA list, the key check: each on its own, a failure is a warning line."""
        notes = self._host.take_problems()  # from the core's restore_gpu at the end of the run
        try:
            preview = preview_image(session.callbacks.sample, cfg.train_data_dir, getattr(result, "skipped", []))
            write_card(result.lora_path, cfg.trigger_word, lora_family(result.lora_path), preview,
                       f"Trained with lora-scripts on {Path(cfg.base_model).name}")
        except Exception as err:
            notes.append(_warning("the LoRA card (preview, activation text) was not written", err))
        self._host.refresh_loras()  # again: the card is new, and a failed refresh by the core gets a second try
        notes.append(self._host.refresh_problem)
        try:
            notes.append(check_against_host(result.lora_path))
        except Exception as err:
            notes.append(_warning("the LoRA was not checked against the WebUI's LoRA loader", err))
        return "\n".join(n for n in notes if n)

    def test_job(self, task_id: str) -> Any:
        return webui_job(task_id or self.new_task_id())  # the renders and the scoring: one job, one progress bar

    def test_pictures(self, cfg: Any, lora_path: Path, prompt: str, seed: int) -> Tuple[List[Any], List[str]]:
        try:
            return on_main_thread(lambda: txt2img_pictures(Path(lora_path).stem, prompt, seed, cfg.resolution))
        finally:
            try:
                on_main_thread(release_test_memory)
            except Exception as err:  # memory left to the WebUI must never cost the user the grid
                print(f"[LoRA Trainer] could not release the Test grid's memory: {type(err).__name__}: {err}",
                      flush=True)

    @contextmanager
    def scoring_memory(self) -> Iterator[None]:
        # As for captioning: the WebUI's model leaves the GPU while CoCa is on it, and comes back after.
        self._host.free_gpu()
        try:
            yield
        finally:
            self._host.restore_gpu()

    def after_test(self, cfg: Any, lora_path: Path, best: Optional[float]) -> str:
        """The best strength into the card's preferred weight and the file's usage hint (each on its own, a failure
        is a warning line), then the LoRA list refreshed so the Lora cards show it."""
        from lora_trainer.adapters.export import write_usage_weight

        notes, written = [], []
        if best is not None:
            lora_path = Path(lora_path)
            try:
                written.append(f"the card's preferred weight ({set_preferred_weight(lora_path, best).name})")
            except Exception as err:
                notes.append(_warning("the card's preferred weight was not updated", err))
            try:
                hint = write_usage_weight(lora_path, best, cfg.trigger_word)
                written.append(f"the usage hint of {lora_path.name} ({hint})")
            except Exception as err:
                notes.append(_warning("the usage hint in the LoRA file was not updated", err))
            self._host.refresh_loras()
            notes.append(self._host.refresh_problem)
        if written:
            notes.insert(0, f"strength {best:g} written into {' and '.join(written)}")
        notes += self._host.take_problems()  # from putting the WebUI's model back after scoring
        return "\n".join(n for n in notes if n)

    def checkpoint_dir(self, base_path: Path) -> Path:
        return merging.checkpoint_dir()  # --ckpt-dir, else models/Stable-diffusion: where the WebUI's merger writes

    def preferred_strength(self, lora_path: Path) -> Optional[float]:
        return preferred_weight(lora_path)  # the card's: 0.8 after training, Test's best strength after Test

    def after_merge(self, checkpoint: Path) -> str:
        return merging.after_merge(checkpoint)

    def add_send_buttons(self, gr: Any, infotext: Any) -> None:
        try:
            from modules import infotext_utils as paste  # A1111 1.8+ and Forge
        except ImportError:
            from modules import generation_parameters_copypaste as paste  # its name before 1.8
        button = gr.Button("Send to txt2img", elem_id="lora_trainer_send_to_txt2img")
        # Bound by the WebUI after every tab is built (ui.py: connect_paste_params_buttons).
        paste.register_paste_params_button(paste.ParamBinding(paste_button=button, tabname="txt2img",
                                                              source_text_component=infotext))
