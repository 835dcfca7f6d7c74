"""The A1111 / Forge glue in one place: the core's HostInterface, progress on the WebUI's bar, and the tab's backend.

Every `modules.*` access happens in a method, never at import: the tests put stand-in
`modules` objects in sys.modules, and Forge lacks some A1111 functions (each use says which).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

from lora_trainer.callbacks import Callbacks, HostInterface
from lora_trainer.files import atomic_write_text
from lora_trainer.ui.blocks import Backend
from lora_trainer.ui.session import TEST_STRENGTHS

from .keycheck import module_names_from_state_dict, unmatched_keys

PREFERRED_WEIGHT = 0.8
SD_VERSION = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}  # ui_edit_user_metadata.py's "sd version" choices


def _modules():
    from modules import devices, sd_models, shared  # noqa: F401 - the WebUI's own

    return shared, sd_models, devices


class A1111Host(HostInterface):
    """Where LoRAs go (`--lora-dir`), freeing and restoring the WebUI's model, refreshing its LoRA list."""

    def __init__(self) -> None:
        self.freed = False

    def lora_dir(self) -> Optional[Path]:
        shared, _, _ = _modules()
        configured = getattr(shared.cmd_opts, "lora_dir", None)  # added by extensions-builtin/Lora/preload.py
        if configured:
            return Path(configured)
        from modules import paths

        return Path(paths.models_path) / "Lora"

    def free_gpu(self) -> None:
        shared, sd_models, devices = _modules()
        if hasattr(sd_models, "send_model_to_cpu"):  # A1111 1.6+
            if getattr(shared, "sd_model", None) is not None:
                sd_models.send_model_to_cpu(shared.sd_model)
                self.freed = True
        else:  # Forge: its memory manager unloads, and loads the model again on the next generation
            try:
                from backend import memory_management

                memory_management.unload_all_models()
            except ImportError:
                pass
        devices.torch_gc()

    def restore_gpu(self) -> None:
        shared, sd_models, devices = _modules()
        if self.freed and hasattr(sd_models, "send_model_to_device"):
            sd_models.send_model_to_device(shared.sd_model)
            self.freed = False
        devices.torch_gc()

    def refresh_loras(self) -> None:
        networks = sys.modules.get("networks")  # extensions-builtin/Lora's module, loaded by the WebUI
        if networks is not None and hasattr(networks, "list_available_networks"):
            networks.list_available_networks()


class A1111Callbacks(Callbacks):
    """The WebUI's own progress bar and Interrupt button (shared.state)."""

    def on_progress(self, step: int, total: int) -> None:
        state = _modules()[0].state
        state.job_count = 1
        state.sampling_steps = total
        state.sampling_step = step

    def on_status(self, message: str) -> None:
        _modules()[0].state.textinfo = message

    def should_stop(self) -> bool:
        state = _modules()[0].state
        return bool(getattr(state, "interrupted", False) or getattr(state, "stopping_generation", False))


def write_card(lora_path: Path, trigger_word: str, family: str, preview: Any = None, description: str = "") -> Path:
    """The extra-networks card: `<name>.json` (ui_edit_user_metadata keys) and `<name>.preview.png`."""
    lora_path = Path(lora_path)
    card = {"description": description, "sd version": SD_VERSION.get(family, "Unknown"),
            "activation text": trigger_word, "preferred weight": PREFERRED_WEIGHT, "negative text": "", "notes": ""}
    path = atomic_write_text(lora_path.with_suffix(".json"), json.dumps(card, indent=4))
    if preview is not None:
        from PIL import Image

        image = preview if isinstance(preview, Image.Image) else Image.open(preview)
        image.save(lora_path.with_suffix(".preview.png"))
    return path


def check_against_host(lora_path: Path, known: Optional[set] = None, convert: Any = None) -> str:
    """'' when A1111 would apply every key of the file, else a message naming the keys it would drop."""
    from lora_trainer.export import read_lora

    tensors, _ = read_lora(Path(lora_path))
    if known is None:
        shared = _modules()[0]
        known = set(getattr(shared.sd_model, "network_layer_mapping", {}) or {})
        if not known:
            known = module_names_from_state_dict(shared.sd_model.state_dict().keys())
        networks = sys.modules.get("networks")
        convert = convert or getattr(networks, "convert_diffusers_name_to_compvis", None)
        if convert is not None:
            is_sd2 = bool(getattr(shared.sd_model, "is_sd2", False))
            host_convert = convert
            convert = lambda name: host_convert(name, is_sd2)  # noqa: E731
    missing = unmatched_keys(tensors, known, convert)
    if not missing:
        return ""
    return (f"Error: the WebUI would ignore {len(missing)} layer(s) of this LoRA (e.g. {missing[0]}): "
            "it would load with little or no effect. Please report this with the model you trained on.")


class A1111Backend(Backend):
    """The tab inside the WebUI: the selected checkpoint, its GPU, its LoRA folder, its txt2img."""

    title = "Train LoRA"
    refresh_js = "() => { if (window.loraTrainerRefreshNetworks) loraTrainerRefreshNetworks(); }"

    def __init__(self, host: Optional[A1111Host] = None) -> None:
        self._host = host or A1111Host()

    def default_base_model(self) -> str:
        shared = _modules()[0]
        info = getattr(getattr(shared, "sd_model", None), "sd_checkpoint_info", None)
        if info is not None and getattr(info, "filename", None):
            return str(info.filename)
        return str(getattr(shared.opts, "sd_model_checkpoint", "") or "")

    def output_root(self) -> Path:
        from modules import paths

        configured = getattr(_modules()[0].opts, "lora_trainer_output_dir", "")  # Settings → LoRA Trainer
        return Path(configured) if configured else Path(paths.data_path) / "outputs" / "lora_trainer"

    def host(self) -> A1111Host:
        return self._host

    def progress_callbacks(self) -> Callbacks:
        return A1111Callbacks()

    def train(self, cfg: Any, callbacks: Callbacks) -> Any:
        from lora_trainer.train import train

        shared = _modules()[0]
        shared.state.begin(job="lora_trainer")
        try:
            return train(cfg, callbacks=callbacks, host=self._host)
        finally:
            shared.state.end()

    def after_training(self, cfg: Any, result: Any, session: Any) -> str:
        from lora_trainer.export import read_lora

        _, meta = read_lora(Path(result.lora_path))
        family = {"sd_v1": "sd1", "sd_v2": "sd2"}.get(meta.get("ss_base_model_version", ""), "sdxl")
        if str(meta.get("ss_base_model_version", "")).startswith("sd_v2"):
            family = "sd2"
        preview = session.callbacks.sample or _first_image(cfg.train_data_dir)  # no sample prompts: a training image
        write_card(result.lora_path, cfg.trigger_word, family, preview,
                   f"Trained with lora-scripts on {Path(cfg.base_model).name}")
        self._host.refresh_loras()
        return check_against_host(result.lora_path)

    def test_grid(self, cfg: Any, lora_path: Path, prompt: str, seed: int) -> Any:
        return txt2img_grid(Path(lora_path).stem, prompt or cfg.trigger_word, seed)


def _first_image(folder: str) -> Optional[Path]:
    from lora_trainer.images import list_images

    images = list_images(Path(folder)) if Path(folder).is_dir() else []
    return images[0] if images else None


def txt2img_grid(lora_name: str, prompt: str, seed: int, steps: int = 20) -> Any:
    """Render `prompt` at each test strength through the WebUI's own txt2img, as one image grid."""
    from modules import images, processing, shared

    pics = []
    for w in TEST_STRENGTHS:
        text = f"{prompt} <lora:{lora_name}:{w:g}>" if w else prompt
        p = processing.StableDiffusionProcessingTxt2Img(sd_model=shared.sd_model, prompt=text, seed=seed,
                                                        steps=steps, width=512, height=512, do_not_save_grid=True,
                                                        do_not_save_samples=True)
        pics += processing.process_images(p).images[:1]
    return images.image_grid(pics, rows=1)
