"""Train Flux LoRA: Flux.1 from the graph or ComfyUI's model folders + a dataset folder → a LoRA in models/loras.

Each part comes from the graph (MODEL from `UNETLoader`, CLIP from `DualCLIPLoader` type flux, VAE from
`VAELoader`: the names left at "(from inputs)") or from disk, read by the core as those loaders would read the
files: the transformer (models/diffusion_models or models/unet), CLIP-L and T5 (models/text_encoders or
models/clip), the autoencoder (models/vae). The graph's parts are handed over as ComfyUI's CheckpointSave
gathers them (any LoRA applied upstream baked in). T5's tokenizer is the one ComfyUI ships
(comfy/text_encoders/t5_tokenizer). The file is written in the kohya Flux layout, which `LoraLoaderModelOnly`
and `LoraLoader` load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from ..lora_trainer.data.doctor import examine
from ..lora_trainer.training.checkpoints import latest_run_dir
from ..lora_trainer.training.loop import train
from .fingerprint import folder_fingerprint
from .host import ComfyCallbacks, ComfyHost, graph_weights
from .images import loss_curve
from .inputs import TRAIN_FIELDS, node_words, tooltip
from .train_node import CATEGORY, FROM_GRAPH, apply_result, node_config, report, training_inputs

# The config keys under the node's own input names, in the messages a user reads.
FLUX_FIELDS = {**TRAIN_FIELDS, "base_model": "unet_name", "clip_l": "clip_l_name", "t5xxl": "t5xxl_name",
               "vae": "vae_name"}
FOLDERS = {"unet_name": "diffusion_models", "clip_l_name": "text_encoders", "t5xxl_name": "text_encoders",
           "vae_name": "vae"}
# the graph input each file input can come from, and the loader that gives it
GRAPH_INPUT = {"unet_name": ("model", "UNETLoader"), "clip_l_name": ("clip", "DualCLIPLoader (type flux)"),
               "t5xxl_name": ("clip", "DualCLIPLoader (type flux)"), "vae_name": ("vae", "VAELoader")}


class TrainFluxLoRA:
    DESCRIPTION = ("Train a Flux.1 dev/schnell LoRA from the model files ComfyUI has (transformer, CLIP-L, T5, VAE) "
                   "on a folder of captioned images; saved into models/loras in the kohya Flux layout.")
    CATEGORY = CATEGORY
    FUNCTION = "train"
    RETURN_TYPES = ("MODEL", "STRING", "IMAGE", "STRING")
    RETURN_NAMES = ("MODEL", "lora_name", "loss_curve", "report")
    OUTPUT_TOOLTIPS = ("The MODEL input with the new LoRA applied (strength 1); none when the transformer came "
                       "from unet_name (load the LoRA with LoraLoaderModelOnly then).",
                       "File name of the LoRA in models/loras (for LoraLoaderModelOnly), with any -v2.",
                       "Loss per step and its smoothed line.",
                       "What was trained: the file, the steps, the final loss, where the checkpoints went.")
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        import folder_paths

        def files(input_name: str, help: str) -> tuple:
            graph, loader = GRAPH_INPUT[input_name]
            return ([FROM_GRAPH, *folder_paths.get_filename_list(FOLDERS[input_name])],
                    {"tooltip": f"{help} {FROM_GRAPH}: the {graph.upper()} input ({loader})."})

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
                "model": ("MODEL", {"tooltip": "The Flux.1 model from UNETLoader (unet_name (from inputs))."}),
                "clip": ("CLIP", {"tooltip": "CLIP-L + T5 from DualCLIPLoader, type flux (clip_l_name and "
                                  "t5xxl_name (from inputs))."}),
                "vae": ("VAE", {"tooltip": "The Flux autoencoder from VAELoader (vae_name (from inputs))."}),
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
              batch_size: int, seed: int, config_file: str = "", resume: bool = False, model: Any = None,
              clip: Any = None, vae: Any = None, unique_id: Optional[str] = None) -> dict:
        callbacks = ComfyCallbacks(unique_id)
        names = {"unet_name": unet_name, "clip_l_name": clip_l_name, "t5xxl_name": t5xxl_name, "vae_name": vae_name}
        graph = {"model": model, "clip": clip, "vae": vae}
        with node_words(FLUX_FIELDS):
            check_graph_inputs(names, graph)
            cfg = node_config(dataset_path, lora_name, rank, alpha, steps, learning_rate, resolution, batch_size,
                              seed, config_file, FROM_GRAPH, **flux_files(**names))
            dataset = f"dataset: {examine(cfg=cfg).summary()}"
            callbacks.on_status(dataset)
            with torch.inference_mode(False), torch.enable_grad():
                base = None
                if unet_name == FROM_GRAPH:  # the parts named on disk are read from disk; the rest from the graph
                    used = {GRAPH_INPUT[n][0] for n, v in names.items() if v == FROM_GRAPH}
                    base = graph_weights(model, *(graph[k] if k in used else None for k in ("clip", "vae")))
                result = train(cfg, callbacks, ComfyHost(), base_weights=base,
                               resume=latest_run_dir(cfg.output_dir) if resume else None)
        callbacks.raise_if_stopped("the state is saved; queue again with resume on to continue")
        text = report(result, str(result.output_dir or cfg.output_dir), dataset)
        if unet_name == FROM_GRAPH:
            model_lora, _, curve = apply_result(result, model)
        else:
            model_lora = None
            curve = loss_curve(result.losses, val=result.val_losses, first_step=result.steps - len(result.losses) + 1)
        return {"ui": {"text": [text]}, "result": (model_lora, result.lora_path.name, curve, text)}


def check_graph_inputs(names: dict, graph: dict) -> None:
    """Each name left at (from inputs) needs its graph input connected; a graph CLIP or VAE needs the graph MODEL."""
    from ..lora_trainer.errors import ConfigError

    for name, value in names.items():
        graph_input, loader = GRAPH_INPUT[name]
        if value == FROM_GRAPH and graph[graph_input] is None:
            raise ConfigError(f"{name} is {FROM_GRAPH}: connect the {graph_input.upper()} input ({loader}), or pick "
                              "a file.")
    if names["unet_name"] != FROM_GRAPH and FROM_GRAPH in names.values():
        raise ConfigError(f"CLIP or VAE {FROM_GRAPH} come with the graph's MODEL: set unet_name to {FROM_GRAPH} "
                          "too, or pick every part as a file.")


def flux_files(unet_name: str, clip_l_name: str, t5xxl_name: str, vae_name: str) -> dict:
    """The config's Flux paths from the names the node lists (none for a part from the graph), and the T5
    tokenizer ComfyUI ships."""
    import folder_paths

    names = {"unet_name": unet_name, "clip_l_name": clip_l_name, "t5xxl_name": t5xxl_name, "vae_name": vae_name}
    paths = {name: folder_paths.get_full_path_or_raise(FOLDERS[name], value) if value != FROM_GRAPH else ""
             for name, value in names.items()}
    tokenizer = Path(folder_paths.base_path) / "comfy" / "text_encoders" / "t5_tokenizer"
    found = {"base_model": paths["unet_name"], "clip_l": paths["clip_l_name"], "t5xxl": paths["t5xxl_name"],
             "vae": paths["vae_name"], "t5_tokenizer": str(tokenizer)}
    return {k: v for k, v in found.items() if v}
