"""Stand-ins for the ComfyUI modules the nodes import (`folder_paths`, `comfy.*`, `nodes`), and the pack loader.

`install(root)` puts them into sys.modules (the `comfy_modules` fixture removes them again).
They mimic what the nodes rely on, as read from ComfyUI 0.8.0:
- `comfy.utils.ProgressBar.update_absolute` runs the global hook, which in ComfyUI calls
  `throw_exception_if_processing_interrupted()` (so Cancel raises from inside a progress update);
- `ModelPatcher.clone()` gives a new object and `add_patches` records keys (LoraLoader's effect);
- `BaseModel.state_dict_for_saving(clip_sd, vae_sd, ...)` gives the original single-file layout;
- `comfy.lora.model_lora_keys_unet/clip` give `lora_unet_<diffusers path>` / `lora_te_text_model_...` keys
  for the model's Linear/Conv layers (ComfyUI derives the same names from the UNet config).
Weights are loaded under torch.inference_mode(), as ComfyUI loads them.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import load_file

PACK = "lora_scripts_pack"  # ComfyUI imports the checkout under its folder's name; any name works
MODULES = ("folder_paths", "comfy", "comfy.model_management", "comfy.utils", "comfy.lora", "comfy.sd", "nodes")


def load_pack(root: Path):
    """Import the repo root as a package, the way ComfyUI's load_custom_node does."""
    if PACK in sys.modules:
        return sys.modules[PACK]
    spec = importlib.util.spec_from_file_location(PACK, root / "__init__.py", submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    spec.loader.exec_module(module)
    return module


class InterruptProcessingException(Exception):
    pass


class State:
    """What the stand-ins recorded, and the knobs a test turns."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.calls: list[str] = []
        self.interrupted = False
        self.interrupt_at_step: int | None = None  # Cancel pressed when the bar reaches this value
        self.progress: list[tuple[int, int]] = []
        self.sampled: list[float] = []
        self.inference_mode_seen: list[bool] = []


class ModelPatcher:
    def __init__(self, model, patches=()):
        self.model, self.patches = model, list(patches)

    def clone(self):
        return ModelPatcher(self.model, self.patches)

    def add_patches(self, patches, strength=1.0):
        self.patches.append((strength, sorted(patches)))
        return list(patches)


class BaseModel:
    def __init__(self, unet_sd, lora_names):
        self.unet_sd, self.lora_names = unet_sd, lora_names

    def state_dict_for_saving(self, clip_sd=None, vae_sd=None, clip_vision_sd=None):
        sd = {f"model.diffusion_model.{k}": v for k, v in self.unet_sd.items()}
        sd.update({k.replace("clip_l.", "cond_stage_model.", 1): v for k, v in (clip_sd or {}).items()})
        sd.update({f"first_stage_model.{k}": v for k, v in (vae_sd or {}).items()})
        return sd


class FluxModel(BaseModel):
    """comfy.model_base.Flux: its supported_models.Flux saves the all-in-one layout (text_encoders., vae.)."""

    def state_dict_for_saving(self, clip_sd=None, vae_sd=None, clip_vision_sd=None):
        sd = {f"model.diffusion_model.{k}": v for k, v in self.unet_sd.items()}
        sd.update({f"text_encoders.{k}": v for k, v in (clip_sd or {}).items()})
        sd.update({f"vae.{k}": v for k, v in (vae_sd or {}).items()})
        return sd


class CLIP:
    def __init__(self, sd, lora_names, patches=()):
        self.sd, self.patches = sd, list(patches)
        self.cond_stage_model = types.SimpleNamespace(lora_names=lora_names)

    def load_model(self):
        return ModelPatcher(self.cond_stage_model)

    def get_sd(self):
        return dict(self.sd)

    def clone(self):
        return CLIP(self.sd, self.cond_stage_model.lora_names, self.patches)

    def add_patches(self, patches, strength=1.0):
        self.patches.append((strength, sorted(patches)))
        return list(patches)


class VAE:
    def __init__(self, sd):
        self.sd = sd

    def get_sd(self):
        return dict(self.sd)


def graph_models(checkpoint: Path, components):
    """(MODEL, CLIP, VAE) holding the checkpoint's weights, as a ComfyUI checkpoint loader gives them."""
    with torch.inference_mode():
        sd = load_file(str(checkpoint))
    split = {"model.diffusion_model.": {}, "cond_stage_model.": {}, "first_stage_model.": {}}
    for key, value in sd.items():
        for prefix, part in split.items():
            if key.startswith(prefix):
                part[key[len(prefix):]] = value
    layers = (torch.nn.Linear, torch.nn.Conv2d)
    unet_names = {"lora_unet_" + n.replace(".", "_") for n, m in components.unet.named_modules()
                  if isinstance(m, layers)}
    clip_map = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj")
    te_names = {"lora_te_text_model_encoder_layers_" + n.split("encoder.layers.", 1)[1].replace(".", "_")
                for n, _ in components.text_encoders[0].named_modules()
                if "encoder.layers." in n and n.endswith(clip_map)}  # comfy.lora's LORA_CLIP_MAP
    model = ModelPatcher(BaseModel(split["model.diffusion_model."], unet_names))
    clip = CLIP({f"clip_l.{k}": v for k, v in split["cond_stage_model."].items()}, te_names)
    return model, clip, VAE(split["first_stage_model."])


def flux_graph_models(files: dict):
    """(MODEL, CLIP, VAE) as UNETLoader, DualCLIPLoader (type flux) and VAELoader give them for Flux's files."""
    with torch.inference_mode():
        unet, clip_l, t5, ae = (load_file(files[k]) for k in ("base_model", "clip_l", "t5xxl", "vae"))
    clip = {**{f"clip_l.transformer.{k}": v for k, v in clip_l.items()},
            **{f"t5xxl.transformer.{k}": v for k, v in t5.items()}}
    names = {"lora_unet_" + k[:-len(".weight")].replace(".", "_") for k in unet if k.endswith(".weight")}
    return ModelPatcher(FluxModel(unet, names)), CLIP(clip, set()), VAE(ae)


def install(base: Path, components_for_checkpoints=None) -> State:
    state = State(base)
    loras, checkpoints, output = base / "models" / "loras", base / "models" / "checkpoints", base / "output"
    folders = {"loras": loras, "checkpoints": checkpoints, "diffusion_models": base / "models" / "diffusion_models",
               "text_encoders": base / "models" / "text_encoders", "vae": base / "models" / "vae"}
    for folder in (*folders.values(), output):
        folder.mkdir(parents=True, exist_ok=True)

    fp = types.ModuleType("folder_paths")
    fp.base_path = str(base)
    fp.filename_list_cache = {}
    fp.get_folder_paths = lambda name: [str(folders[name])]
    fp.get_output_directory = lambda: str(output)
    fp.models_dir = str(base / "models")
    fp.get_filename_list = lambda name: sorted(p.name for p in folders[name].iterdir() if p.is_file())

    def get_full_path_or_raise(name, filename):
        path = folders[name] / filename
        if not path.is_file():
            raise FileNotFoundError(f"Model in folder '{name}' with filename '{filename}' not found.")
        return str(path)

    fp.get_full_path_or_raise = get_full_path_or_raise

    mm = types.ModuleType("comfy.model_management")
    mm.InterruptProcessingException = InterruptProcessingException
    mm.unload_all_models = lambda: state.calls.append("unload_all_models")
    mm.soft_empty_cache = lambda force=False: state.calls.append("soft_empty_cache")
    mm.load_models_gpu = lambda models, **kw: state.calls.append(f"load_models_gpu:{kw}")
    mm.processing_interrupted = lambda: state.interrupted

    def throw_exception_if_processing_interrupted():
        if state.interrupted:
            state.interrupted = False
            raise InterruptProcessingException()

    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted

    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total, self.node_id, self.current = total, node_id, 0

        def update_absolute(self, value, total=None, preview=None):
            self.current = value
            state.progress.append((value, self.total))
            state.inference_mode_seen.append(torch.is_inference_mode_enabled())
            if state.interrupt_at_step is not None and value >= state.interrupt_at_step:
                state.interrupted = True
            throw_exception_if_processing_interrupted()  # ComfyUI's hook (main.py hijack_progress)

    utils.ProgressBar = ProgressBar
    utils.load_torch_file = lambda path, safe_load=False: load_file(path)

    lora = types.ModuleType("comfy.lora")

    def model_lora_keys_unet(model, key_map={}):
        key_map.update({name: name for name in model.lora_names})
        return key_map

    def model_lora_keys_clip(model, key_map={}):
        key_map.update({name: name for name in model.lora_names})
        return key_map

    lora.model_lora_keys_unet, lora.model_lora_keys_clip = model_lora_keys_unet, model_lora_keys_clip

    sd_module = types.ModuleType("comfy.sd")

    def load_lora_for_models(model, clip, lora_sd, strength_model, strength_clip):
        names = {k.split(".", 1)[0] for k in lora_sd}
        new_model, new_clip = model.clone(), clip.clone() if clip is not None else None  # LoraLoaderModelOnly: None
        new_model.add_patches({n for n in names if n.startswith("lora_unet_")}, strength_model)
        if new_clip is not None:
            new_clip.add_patches({n for n in names if n.startswith("lora_te")}, strength_clip)
        return new_model, new_clip

    sd_module.load_lora_for_models = load_lora_for_models

    comfy = types.ModuleType("comfy")
    comfy.__path__ = []
    comfy.model_management, comfy.utils, comfy.lora, comfy.sd = mm, utils, lora, sd_module

    nodes = types.ModuleType("nodes")

    class CheckpointLoaderSimple:
        def load_checkpoint(self, ckpt_name):
            return graph_models(Path(get_full_path_or_raise("checkpoints", ckpt_name)), components_for_checkpoints)

    class CLIPTextEncode:
        def encode(self, clip, text):
            return ([[torch.zeros(1, 4, 8), {"patches": clip.patches, "text": text}]],)

    class EmptyLatentImage:
        def generate(self, width, height, batch_size=1):
            return ({"samples": torch.zeros(batch_size, 4, height // 8, width // 8)},)

    def common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, **kw):
        strength = sum(s for s, _ in model.patches)
        state.sampled.append(strength)
        return ({"samples": torch.full_like(latent["samples"], strength)},)

    class VAEDecode:
        def decode(self, vae, samples):
            s = samples["samples"]
            return (torch.full((s.shape[0], s.shape[2] * 8, s.shape[3] * 8, 3), float(s.mean())),)

    nodes.CheckpointLoaderSimple, nodes.CLIPTextEncode, nodes.EmptyLatentImage = (
        CheckpointLoaderSimple, CLIPTextEncode, EmptyLatentImage)
    nodes.common_ksampler, nodes.VAEDecode = common_ksampler, VAEDecode

    for name, module in {"folder_paths": fp, "comfy": comfy, "comfy.model_management": mm, "comfy.utils": utils,
                         "comfy.lora": lora, "comfy.sd": sd_module, "nodes": nodes}.items():
        sys.modules[name] = module
    return state


def uninstall() -> None:
    for name in MODULES:
        sys.modules.pop(name, None)
