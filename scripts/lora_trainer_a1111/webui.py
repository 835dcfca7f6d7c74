"""The WebUI's own modules, read at call time, and running as one of its jobs.

Every `modules.*` access happens in a function, never at import: the tests put stand-in `modules`
objects in sys.modules. Forge keeps A1111's module names but not all of their behaviour; `is_forge()` picks.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator


def webui_modules() -> Any:
    """(shared, sd_models, devices): the WebUI's own."""
    from modules import devices, sd_models, shared  # noqa: F401 - the WebUI's own

    return shared, sd_models, devices


def is_forge() -> bool:
    """Forge imports its `modules_forge` package at start-up, before any extension."""
    return sys.modules.get("modules_forge") is not None


# Where Forge ships T5's tokenizer for Flux, under its own folder (paths.script_path)
FORGE_T5_TOKENIZER = ("backend", "huggingface", "black-forest-labs", "FLUX.1-dev", "tokenizer_2")


def forge_flux_config(cfg: Any) -> Any:
    """`cfg` with what Forge runs its Flux model with, where the config leaves it empty: the text encoders and VAE
    chosen in Forge's VAE / Text Encoder box (shared.opts.forge_additional_modules, each told apart by its keys)
    and Forge's T5 tokenizer. An all-in-one checkpoint needs none of them."""
    from pathlib import Path

    from lora_trainer.model.flux import part_of_file
    from modules import paths

    chosen = {}
    for path in getattr(webui_modules()[0].opts, "forge_additional_modules", None) or []:
        part = part_of_file(path)
        if part is not None and not getattr(cfg, part) and part not in chosen:
            chosen[part] = str(path)
    if not cfg.t5_tokenizer:
        chosen["t5_tokenizer"] = str(Path(paths.script_path, *FORGE_T5_TOKENIZER))
    return cfg.replace(**chosen)


def loaded_model() -> Any:
    """The WebUI's model without loading one (`shared.sd_model` would load a checkpoint when none is)."""
    return webui_modules()[1].model_data.sd_model


@contextmanager
def webui_job(task_id: str) -> Iterator[None]:
    """Run as one WebUI job, as call_queue.wrap_gradio_gpu_call does: queued behind txt2img/img2img
    (queue_lock), shown by the WebUI's progress API under `task_id`, flags reset for the next job."""
    from modules import call_queue, progress

    state = webui_modules()[0].state
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
