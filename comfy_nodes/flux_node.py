"""Train Flux LoRA: Flux.1's four files from ComfyUI's model folders + a dataset folder → a LoRA in models/loras.

The transformer (models/diffusion_models or models/unet), CLIP-L and T5 (models/text_encoders or models/clip)
and the autoencoder (models/vae) are read from disk by the core, as `UNETLoader`, `DualCLIPLoader` and
`VAELoader` would read them; T5's tokenizer is the one ComfyUI ships (comfy/text_encoders/t5_tokenizer). The
file is written in the kohya Flux layout, which `LoraLoaderModelOnly` and `LoraLoader` load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from ..lora_trainer.data.doctor import examine
from ..lora_trainer.training.checkpoints import latest_run_dir
from ..lora_trainer.training.loop import train
from .fingerprint import folder_fingerprint
from .host import ComfyCallbacks, ComfyHost
from .images import loss_curve
from .inputs import TRAIN_FIELDS, node_words, tooltip
from .train_node import CATEGORY, FROM_GRAPH, node_config, report, training_inputs

# The config keys under the node's own input names, in the messages a user reads.
FLUX_FIELDS = {**TRAIN_FIELDS, "base_model": "unet_name", "clip_l": "clip_l_name", "t5xxl": "t5xxl_name",
               "vae": "vae_name"}
FOLDERS = {"unet_name": "diffusion_models", "clip_l_name": "text_encoders", "t5xxl_name": "text_encoders",
           "vae_name": "vae"}


class TrainFluxLoRA:
    DESCRIPTION = ("Train a Flux.1 dev/schnell LoRA from the model files ComfyUI has (transformer, CLIP-L, T5, VAE) "
                   "on a folder of captioned images; saved into models/loras in the kohya Flux layout.")
    CATEGORY = CATEGORY
    FUNCTION = "train"
    RETURN_TYPES = ("STRING", "IMAGE", "STRING")
    RETURN_NAMES = ("lora_name", "loss_curve", "report")
    OUTPUT_TOOLTIPS = ("File name of the LoRA in models/loras (for LoraLoaderModelOnly), with any -v2.",
                       "Loss per step and its smoothed line.",
                       "What was trained: the file, the steps, the final loss, where the checkpoints went.")
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        import folder_paths

        def files(input_name: str, help: str) -> tuple:
            return (folder_paths.get_filename_list(FOLDERS[input_name]), {"tooltip": help})

        return {
            "required": {
                "unet_name": files("unet_name", "The Flux.1 transformer (flux1-dev / flux1-schnell, fp8 too), as "
                                   "UNETLoader lists it."),
                "clip_l_name": files("clip_l_name", tooltip("clip_l")),
                "t5xxl_name": files("t5xxl_name", tooltip("t5xxl")),
                "vae_name": files("vae_name", tooltip("vae")),
                **training_inputs("my_flux_lora", steps=1000, resolution=dict(default=1024, min=256, max=2048, step=16),
                                  learning_rate=1e-4),
            },
            "optional": {
                "config_file": ("STRING", {"default": "", "tooltip": "Optional YAML config (see docs/flux.md) for "
                                           "every other setting, e.g. base_precision: fp8; the inputs above win."}),
                "resume": ("BOOLEAN", {"default": False, "tooltip": "Continue the stopped run saved in "
                                       "output/lora_trainer/<lora_name> (its newest -vN)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, dataset_path: Any = None, config_file: Any = None, **_: Any) -> str:
        return folder_fingerprint(dataset_path, config_file)

    def train(self, dataset_path: str, lora_name: str, unet_name: str, clip_l_name: str, t5xxl_name: str,
              vae_name: str, rank: int, alpha: float, steps: int, learning_rate: float, resolution: int,
              batch_size: int, seed: int, config_file: str = "", resume: bool = False,
              unique_id: Optional[str] = None) -> dict:
        callbacks = ComfyCallbacks(unique_id)
        with node_words(FLUX_FIELDS):
            cfg = node_config(dataset_path, lora_name, rank, alpha, steps, learning_rate, resolution, batch_size,
                              seed, config_file, FROM_GRAPH, **flux_files(unet_name, clip_l_name, t5xxl_name, vae_name))
            dataset = f"dataset: {examine(cfg=cfg).summary()}"
            callbacks.on_status(dataset)
            with torch.inference_mode(False), torch.enable_grad():
                result = train(cfg, callbacks, ComfyHost(), resume=latest_run_dir(cfg.output_dir) if resume else None)
        callbacks.raise_if_stopped("the state is saved; queue again with resume on to continue")
        text = report(result, str(result.output_dir or cfg.output_dir), dataset)
        curve = loss_curve(result.losses, val=result.val_losses, first_step=result.steps - len(result.losses) + 1)
        return {"ui": {"text": [text]}, "result": (result.lora_path.name, curve, text)}


def flux_files(unet_name: str, clip_l_name: str, t5xxl_name: str, vae_name: str) -> dict:
    """The config's Flux paths from the names the node lists, and the T5 tokenizer ComfyUI ships."""
    import folder_paths

    names = {"unet_name": unet_name, "clip_l_name": clip_l_name, "t5xxl_name": t5xxl_name, "vae_name": vae_name}
    paths = {name: folder_paths.get_full_path_or_raise(FOLDERS[name], value) for name, value in names.items()}
    tokenizer = Path(folder_paths.base_path) / "comfy" / "text_encoders" / "t5_tokenizer"
    return {"base_model": paths["unet_name"], "clip_l": paths["clip_l_name"], "t5xxl": paths["t5xxl_name"],
            "vae": paths["vae_name"], "t5_tokenizer": str(tokenizer)}
