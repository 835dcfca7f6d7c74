"""Train LoRA: the graph's MODEL/CLIP/VAE (or a checkpoint name) + a dataset folder → a LoRA, applied.

The weights ComfyUI already holds are handed to the core in the original single-file layout (the
way CheckpointSave writes them), so the checkpoint is not read a second time. The finished file
lands in `models/loras` (never overwriting: a taken name gets `-v2`) with the CLI's metadata, and
the outputs carry the MODEL/CLIP with it applied through ComfyUI's own LoRA loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from ..lora_trainer.config import load_config
from ..lora_trainer.data.doctor import examine
from ..lora_trainer.errors import ConfigError
from ..lora_trainer.training.checkpoints import latest_run_dir
from ..lora_trainer.training.loop import TrainResult, train
from ..lora_trainer.training.plan import budget_left_at_default
from .fingerprint import folder_fingerprint
from .host import ComfyCallbacks, ComfyHost, check_lora_keys, graph_weights, load_lora_file
from .images import loss_curve
from .inputs import TRAIN_FIELDS, config_input, node_words, tooltip

FROM_GRAPH = "(from inputs)"  # short: a long value shrinks the widget's label to "…"
CATEGORY = "LoRA Trainer"


class TrainLoRA:
    DESCRIPTION = ("Train a LoRA on a folder of captioned images, save it into models/loras (kohya layout, "
                   "A1111/Forge/ComfyUI metadata) and output the MODEL and CLIP with it applied.")
    CATEGORY = CATEGORY
    FUNCTION = "train"
    RETURN_TYPES = ("MODEL", "CLIP", "STRING", "IMAGE", "STRING")
    RETURN_NAMES = ("MODEL", "CLIP", "lora_name", "loss_curve", "report")
    OUTPUT_TOOLTIPS = ("The input model with the new LoRA applied (strength 1).",
                       "The input CLIP with the new LoRA applied (strength 1).",
                       "File name of the LoRA in models/loras, as LoraLoader lists it (with any -v2).",
                       "Loss per step and its smoothed line.",
                       "What was trained: the file, the steps, the final loss, where the checkpoints and the run's "
                       "report.html went.")
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        import folder_paths

        checkpoints = [FROM_GRAPH, *folder_paths.get_filename_list("checkpoints")]
        return {
            "required": training_inputs("my_lora", steps=500, resolution=dict(min=64, max=2048, step=64)),
            "optional": {
                "model": ("MODEL", {"tooltip": "The base model from the graph (a checkpoint loader)."}),
                "clip": ("CLIP", {"tooltip": "The base model's CLIP, from the same loader."}),
                "vae": ("VAE", {"tooltip": "The base model's VAE (encodes the training images)."}),
                "ckpt_name": (checkpoints, {"default": FROM_GRAPH, "tooltip": f"{FROM_GRAPH}: train on the "
                              "MODEL, CLIP and VAE inputs. A checkpoint: train on it instead (read from disk)."}),
                "config_file": ("STRING", {"default": "", "tooltip": "Optional YAML config (see configs/) for "
                                           "every other setting; the inputs above override its keys."}),
                "resume": ("BOOLEAN", {"default": False, "tooltip": "Continue the stopped run saved in "
                                       "output/lora_trainer/<lora_name> (its newest -vN) instead of starting "
                                       "again. Off: a new run never overwrites an earlier one's files."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, dataset_path: Any = None, config_file: Any = None, **_: Any) -> str:
        return folder_fingerprint(dataset_path, config_file)  # linked inputs arrive as None (fingerprint.py)

    def train(self, dataset_path: str, lora_name: str, rank: int, alpha: float, steps: int, learning_rate: float,
              resolution: int, batch_size: int, seed: int, model: Any = None, clip: Any = None, vae: Any = None,
              ckpt_name: str = FROM_GRAPH, config_file: str = "", resume: bool = False,
              unique_id: Optional[str] = None) -> dict:
        callbacks = ComfyCallbacks(unique_id)
        with node_words(TRAIN_FIELDS):
            cfg = node_config(dataset_path, lora_name, rank, alpha, steps, learning_rate, resolution, batch_size,
                              seed, config_file, ckpt_name if model is None else FROM_GRAPH)
            dataset = f"dataset: {examine(cfg=cfg).summary()}"  # what the doctor finds, up front
            callbacks.on_status(dataset)
            with torch.inference_mode(False), torch.enable_grad():
                result = run_training(cfg, callbacks, model, clip, vae, ckpt_name, resume)
        callbacks.raise_if_stopped("the state is saved; queue again with resume on to continue")
        if model is None:
            import nodes

            model, clip = nodes.CheckpointLoaderSimple().load_checkpoint(ckpt_name)[:2]
        text = report(result, str(result.output_dir or cfg.output_dir), dataset, callbacks.plan)
        model_lora, clip_lora, curve = apply_result(result, model, clip)
        return {"ui": {"text": [text]}, "result": (model_lora, clip_lora, result.lora_path.name, curve, text)}


def training_inputs(lora_name: str, steps: int, resolution: dict, learning_rate: Optional[float] = None) -> dict:
    """The inputs both train nodes have: the dataset, the file name and the run's main settings."""
    lr = {} if learning_rate is None else {"default": learning_rate}
    return {
        "dataset_path": ("STRING", {"default": "", "tooltip": tooltip("train_data_dir") + " Type a path, or "
                                    "connect Caption Folder's dataset_path."}),
        "lora_name": config_input("output_name", default=lora_name, help="File name of the LoRA in models/loras, "
                                  "without .safetensors; a name already taken gets -v2, -v3 (nothing is "
                                  "overwritten)."),
        "rank": config_input("lora_rank", min=1, max=256),
        "alpha": config_input("lora_alpha", min=0.01, max=1024.0, step=0.5),
        "steps": config_input("max_train_steps", default=steps, min=1, max=100000,
                              help="Optimizer steps to train; the node always trains this many (a config file's "
                                   "epochs are not used)."),
        # step 1e-7 (ComfyUI's own training node): the frontend rounds to the step, so 0.000025 stays
        "learning_rate": config_input("learning_rate", min=1e-7, max=1.0, step=1e-7, **lr),
        "resolution": config_input("resolution", **resolution),
        "batch_size": config_input("batch_size", min=1, max=64),
        # The frontend adds "control after generate" to any INT named seed; web/lora_trainer.js sets a fresh
        # node's to "fixed": a new seed would train again on every Run.
        "seed": config_input("seed", min=0, max=2**31 - 1, control_after_generate=True),
    }


def node_config(dataset_path: str, lora_name: str, rank: int, alpha: float, steps: int, learning_rate: float,
                resolution: int, batch_size: int, seed: int, config_file: str, ckpt_name: str, **files: str):
    """The config file's keys, overridden by the node's inputs (`files`: more of them, e.g. Flux's paths); output
    under ComfyUI's output folder."""
    import folder_paths

    if not lora_name.strip() or Path(lora_name).name != lora_name or lora_name in (".", ".."):
        raise ConfigError(f"lora_name {lora_name!r} must be a plain file name (no folders, no '..').")
    extra = dict(train_data_dir=dataset_path.strip(), output_name=lora_name, lora_rank=rank, lora_alpha=alpha,
                 max_train_steps=steps, learning_rate=learning_rate, resolution=resolution, batch_size=batch_size,
                 seed=seed, output_dir=str(Path(folder_paths.get_output_directory()) / "lora_trainer" / lora_name))
    if ckpt_name != FROM_GRAPH:
        extra["base_model"] = folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)
    cfg = load_config(config_file.strip() or None, **extra, **files)
    if torch.cuda.is_available() and budget_left_at_default(cfg.memory_budget_gb):
        cfg = cfg.replace(memory_budget_gb="auto")  # fit what is free once ComfyUI's models are unloaded
    return cfg


def run_training(cfg: Any, callbacks: ComfyCallbacks, model: Any, clip: Any, vae: Any, ckpt_name: str,
                 resume: bool) -> TrainResult:
    """Call the core (under inference_mode(False): the caller's job) with the graph's weights when there are some."""
    base, base_name = None, None
    if model is not None:
        if clip is None or vae is None:
            raise ConfigError("Connect CLIP and VAE together with MODEL (all three from the checkpoint loader).")
        base, base_name = graph_weights(model, clip, vae), (None if ckpt_name == FROM_GRAPH else ckpt_name)
    elif ckpt_name == FROM_GRAPH:
        raise ConfigError("Connect MODEL, CLIP and VAE from a checkpoint loader, or pick a ckpt_name.")
    return train(cfg, callbacks, ComfyHost(), base_weights=base, base_name=base_name,
                 resume=latest_run_dir(cfg.output_dir) if resume else None)


def report(result: TrainResult, output_dir: str, *notes: str) -> str:
    """The lines a user needs after a run: which file to load, how it went, where the rest went."""
    final = next((f"{v:.4f}" for v in reversed(result.losses) if v == v), "none")  # v == v: not NaN
    lines = [f"saved {result.lora_path.name} in models/loras", f"{result.steps} steps, final loss {final}"
             + (f", validation loss {result.val_losses[-1][1]:.4f}" if result.val_losses else ""),
             f"checkpoints, state and logs: {output_dir}"]
    page = Path(output_dir) / "report.html"  # every run writes it (training/record.py); a failed page is logged
    if page.is_file():
        lines.append(f"report: {page}")
    return "\n".join(lines + [n for n in notes if n])


def apply_result(result: TrainResult, model: Any, clip: Any = None) -> tuple:
    """(MODEL, CLIP, loss curve): the file checked against ComfyUI's key map and applied to the graph's MODEL (and
    CLIP, when given) through ComfyUI's own LoRA loader, strength 1.

    The nodes put their report in their outputs and in the UI message built-in nodes use (`ui.text`), which
    web/lora_trainer.js shows on the node.
    """
    import comfy.sd

    lora = load_lora_file(result.lora_path)
    check_lora_keys(lora, model, clip)
    model_lora, clip_lora = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0 if clip is not None else 0.0)
    curve = loss_curve(result.losses, val=result.val_losses, first_step=result.steps - len(result.losses) + 1)
    return model_lora, clip_lora, curve
