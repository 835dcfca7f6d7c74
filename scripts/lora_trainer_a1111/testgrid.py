"""Test: the LoRA at each test strength through the WebUI's own txt2img, and what the WebUI keeps afterwards
handed back."""

from __future__ import annotations

import sys
from contextlib import closing
from typing import Any, List, Tuple

from lora_trainer.ui.session import TEST_STRENGTHS

from .webui import webui_modules, is_forge, loaded_model


def txt2img_pictures(lora_name: str, prompt: str, seed: int, size: int,
                     steps: int = 20) -> Tuple[List[Any], List[str]]:
    """`prompt` at each test strength through the WebUI's own txt2img (fixed seed, as the textual-inversion
    trainer renders its previews); returns the pictures and their infotexts (the prompt with its <lora:…> tag)."""
    from modules import processing

    state = webui_modules()[0].state
    state.job_count = len(TEST_STRENGTHS)  # process_images sets it only while it is -1; one job per picture
    pictures, infotexts = [], []
    for w in TEST_STRENGTHS:
        text = f"{prompt} <lora:{lora_name}:{w:g}>" if w else prompt
        p = processing.StableDiffusionProcessingTxt2Img(prompt=text, seed=seed, steps=steps, width=size, height=size,
                                                        cfg_scale=7, sampler_name="Euler a", do_not_save_grid=True,
                                                        do_not_save_samples=True)
        with closing(p):
            processed = processing.process_images(p)
        pictures.append(processed.images[0])
        infotexts.append(with_prompt(processed.infotexts[0], text))
    return pictures, infotexts


def release_test_memory() -> None:
    """Hand back what the WebUI keeps because of the Test generations (read in A1111 1.10.1 and Forge's code).

    A1111's Lora extension keeps a CPU copy of every weight a LoRA touched (`network_weights_backup`, about the
    size of the UNet and text encoder in fp16) until a checkpoint is loaded again, and the last conds in class
    attributes of `processing`. The weights are restored from those copies first, so no LoRA stays merged. Forge
    keeps the last five LoRA files' tensors in an lru_cache. Then the freed pages go back to the system.
    """
    import torch

    from lora_trainer.training.memory import release

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
    state = webui_modules()[0].state
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
