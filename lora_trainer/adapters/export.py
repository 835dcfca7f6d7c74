"""Write LoRA files the hosts load: kohya layout, real alpha, ss_* and modelspec metadata.

A1111 decides which checkpoints a LoRA is shown for from `ss_base_model_version` / `ss_v2`,
and uses `ss_output_name` as the prompt alias, so these are always written. The whole config
is stored too (`lora_trainer.config`), so a file says how it was made.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from . import keymap
from .lycoris import ALL_PARTS, KINDS, network_args
from ..errors import ModelError
from ..files import atomic_write_with, unused_path

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "flux": "flux1"}
ARCHITECTURE = {
    ("sd1", "epsilon"): "stable-diffusion-v1/lora",
    ("sd2", "epsilon"): "stable-diffusion-v2-512/lora",
    ("sd2", "v_prediction"): "stable-diffusion-v2-768-v/lora",
    ("sdxl", "epsilon"): "stable-diffusion-xl-v1-base/lora",
    ("flux", "dev"): "flux-1-dev/lora",
    ("flux", "schnell"): "flux-1-schnell/lora",
}


def lora_state_dict(components: Any, dtype: torch.dtype = torch.float16, fused: bool = True) -> Dict[str, torch.Tensor]:
    """The kohya-layout tensors of every LoRA layer in `components`.

    A DoRA layer adds `<module>.dora_scale` (dora.py: one magnitude per input column, (1, in[, 1, 1])), always in
    fp32: it multiplies the base weight itself, which fp16 rounding would rescale by up to 0.05 % per column.
    Flux: the hosts' layout (the original fused modules, flux_layout.py); `fused=False` keeps one entry per
    diffusers module (what a resume state needs to rebuild the same layers)."""
    from .dora import input_scale
    from .flux_layout import flux_to_kohya
    from .lora import ADAPTER, dora_module, lora_layers
    from .lycoris import factors, lycoris_layers

    out: Dict[str, torch.Tensor] = {}
    flux_parts: Dict[str, Dict[str, torch.Tensor]] = {}
    for prefix, model in keymap.named_models(components):
        for name, layer in lora_layers(model).items():
            if fused and components.family == "flux" and prefix == keymap.UNET_PREFIX:
                flux_parts[f"transformer.{name}"] = {
                    "down": _cpu(layer.lora_A[ADAPTER].weight, torch.float32),
                    "up": _cpu(layer.lora_B[ADAPTER].weight, torch.float32),
                    "alpha": torch.tensor(float(layer.lora_alpha[ADAPTER]))}
                continue
            key = keymap.kohya_name(prefix, name)
            out[f"{key}.lora_down.weight"] = _cpu(layer.lora_A[ADAPTER].weight, dtype)
            out[f"{key}.lora_up.weight"] = _cpu(layer.lora_B[ADAPTER].weight, dtype)
            out[f"{key}.alpha"] = torch.tensor(float(layer.lora_alpha[ADAPTER]), dtype=dtype)
            dora = dora_module(layer)
            if dora is not None:
                out[f"{key}.dora_scale"] = _cpu(input_scale(dora.weight, layer.get_base_layer().weight.dim()),
                                                torch.float32)
        for name, layer in lycoris_layers(model, ADAPTER).items():  # LoHa/LoKr: the factors as LyCORIS names them
            key = keymap.kohya_name(prefix, name)
            out.update({f"{key}.{part}": _cpu(t, dtype) for part, t in factors(layer, ADAPTER).items()})
            out[f"{key}.alpha"] = torch.tensor(float(layer.alpha[ADAPTER]), dtype=dtype)
    if flux_parts:
        out.update({k: v.to(dtype) for k, v in flux_to_kohya(flux_parts).items()})
    return out


def _cpu(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to("cpu", dtype).contiguous().clone()


def build_metadata(cfg: Any, components: Any, info: Mapping[str, Any]) -> Dict[str, str]:
    """kohya `ss_*`, `modelspec.*` and our own config, all as strings (safetensors requires it).

    `info` carries what only the run knows: steps, epoch, num_images, started_at, tag_frequency,
    dataset_dirs, bucket_info, resolution.
    """
    now = time.time()
    family, pred = components.family, components.prediction_type
    kind = components.variant if family == "flux" else pred  # a Flux file names dev or schnell
    res = info.get("resolution", (cfg.resolution, cfg.resolution))
    meta: Dict[str, Any] = {
        "ss_output_name": cfg.name,
        "ss_base_model_version": BASE_MODEL_VERSION[family] + ("_v" if pred == "v_prediction" and family == "sd2"
                                                              else ""),
        "ss_v2": str(family == "sd2"),
        **(lycoris_metadata(cfg.lora_type, network_args(cfg.lora_type, cfg)) if cfg.lora_type in KINDS else
           network_metadata(cfg.lora_type == "dora", {"conv_dim": cfg.conv_rank, "conv_alpha": cfg.conv_alpha}
                            if cfg.conv_rank else {})),
        **({"ss_network_module": "networks.lora_flux"} if family == "flux" else {}),
        "ss_network_dim": cfg.lora_rank,
        "ss_network_alpha": cfg.lora_alpha,
        "ss_network_dropout": cfg.lora_dropout,
        "ss_sd_model_name": components.name,
        "ss_new_sd_model_hash": components.resolved_hash(),
        "ss_resolution": f"({res[0]}, {res[1]})",
        "ss_enable_bucket": cfg.enable_bucket,
        "ss_min_bucket_reso": cfg.min_bucket_reso,
        "ss_max_bucket_reso": cfg.max_bucket_reso,
        "ss_bucket_no_upscale": cfg.bucket_no_upscale,
        "ss_learning_rate": cfg.learning_rate,
        "ss_unet_lr": cfg.learning_rate,
        "ss_text_encoder_lr": (cfg.text_encoder_lr or cfg.learning_rate) if cfg.train_text_encoder else 0,
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_lr_warmup_steps": cfg.lr_warmup_steps,
        "ss_optimizer": cfg.optimizer,
        "ss_batch_size_per_device": cfg.batch_size,
        "ss_gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "ss_total_batch_size": cfg.batch_size * info.get("processes", 1) * cfg.gradient_accumulation_steps,
        "lora_trainer.processes": info.get("processes", 1),  # torchrun processes that shared each batch
        "ss_gradient_checkpointing": cfg.gradient_checkpointing,
        "ss_mixed_precision": info.get("mixed_precision", cfg.mixed_precision),
        "lora_trainer.base_precision": info.get("base_precision", cfg.base_precision),
        "lora_trainer.memory_changes": info.get("memory_changes", []),  # step-downs after running out of memory
        "ss_seed": cfg.seed,
        "ss_noise_offset": cfg.noise_offset,
        "ss_min_snr_gamma": cfg.min_snr_gamma,
        "ss_max_grad_norm": cfg.max_grad_norm,
        "ss_cache_latents": cfg.cache_latents,
        "ss_caption_dropout_rate": cfg.caption_dropout_rate,
        "ss_keep_tokens": cfg.keep_tokens,
        "ss_flip_aug": cfg.flip_aug,
        "ss_random_crop": cfg.random_crop,
        "ss_num_train_images": info.get("num_images", 0),
        "ss_num_reg_images": info.get("num_reg_images", 0),
        "ss_reg_dataset_dirs": json.dumps(info.get("reg_dataset_dirs", {})),
        "ss_prior_loss_weight": cfg.prior_loss_weight,
        "ss_masked_loss": cfg.masked_loss,
        "ss_num_batches_per_epoch": info.get("batches_per_epoch", 0),
        "ss_num_epochs": info.get("epochs", cfg.epochs),
        "ss_epoch": info.get("epoch", 0),
        "ss_steps": info.get("steps", 0),
        "ss_max_train_steps": info.get("max_train_steps", cfg.max_train_steps),
        "ss_training_started_at": info.get("started_at", now),
        "ss_training_finished_at": now,
        "ss_dataset_dirs": json.dumps(info.get("dataset_dirs", {})),
        "ss_tag_frequency": json.dumps(info.get("tag_frequency", {})),
        "ss_bucket_info": json.dumps(info.get("bucket_info", {})),
        "ss_training_comment": f"trigger: {cfg.trigger_word}" if cfg.trigger_word else "",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ARCHITECTURE.get((family, kind), ARCHITECTURE.get((family, "epsilon"), "")),
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if family == "sdxl"
        else "diffusers",
        "modelspec.title": cfg.name,
        "modelspec.resolution": f"{res[1]}x{res[0]}",
        "modelspec.prediction_type": pred,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)),
        "modelspec.trigger_phrase": cfg.trigger_word,
        "modelspec.usage_hint": usage_hint(cfg.name, 0.7, cfg.trigger_word),
        "lora_trainer.config": cfg.to_json(),
    }
    if info.get("val_loss") is not None:  # validation: the loss on held-out images at these weights
        meta["lora_trainer.val_loss"] = repr(float(info["val_loss"]))
    return {k: v if isinstance(v, str) else json.dumps(v) if isinstance(v, (dict, list)) else str(v)
            for k, v in meta.items()}


def network_metadata(dora: bool, args: Optional[Mapping[str, Any]] = None,
                     on_output: bool = False) -> Dict[str, str]:
    """`ss_network_module` / `ss_network_args` as kohya's scripts record them: a DoRA file the way LyCORIS's
    network module does (`dora_wd`, `wd_on_output`: False for this trainer's per-input-column DoRA, True for a
    converted peft one; its args are strings), so tools and UIs can tell."""
    if not dora:
        return {"ss_network_module": "networks.lora", "ss_network_args": json.dumps(dict(args or {}))}
    lycoris = {"algo": "lora", "dora_wd": "True", "wd_on_output": str(on_output),
               **{k: str(v) for k, v in (args or {}).items()}}
    return {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(lycoris)}


def lycoris_metadata(kind: str, args: Optional[Mapping[str, Any]] = None) -> Dict[str, str]:
    """A LoHa/LoKr file's `ss_network_module` / `ss_network_args`, as LyCORIS's kohya network module writes them."""
    return {"ss_network_module": "lycoris.kohya",
            "ss_network_args": json.dumps({"algo": kind, **{k: str(v) for k, v in (args or {}).items()}})}


def is_dora(tensors: Mapping[str, Any]) -> bool:
    return any(k.endswith(".dora_scale") for k in tensors)


def dora_on_output(tensors: Mapping[str, Any]) -> bool:
    """Whether a kohya state dict's dora_scale tensors are per output row ((out, 1, …): peft, newer LyCORIS)."""
    return any(k.endswith(".dora_scale") and v.shape[0] != 1 for k, v in tensors.items())


def save_lora(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
              overwrite: bool = False) -> Path:
    """Write atomically; an existing file is never replaced unless `overwrite` (checkpoints)."""
    from safetensors.torch import save_file

    target = Path(path) if overwrite else unused_path(path)
    meta = dict(metadata)
    meta["sshs_model_hash"] = addnet_hash(tensors)
    atomic_write_with(target, lambda tmp: save_file(dict(tensors), str(tmp), metadata=meta))
    return target


def addnet_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the tensor bytes after the header: the hash A1111 and kohya show for a LoRA."""
    from safetensors.torch import save

    blob = save(dict(tensors))
    (header_len,) = struct.unpack("<Q", blob[:8])
    return hashlib.sha256(blob[8 + header_len:]).hexdigest()


def stored_precision(path: Path) -> str:
    """The precision a LoRA file stores its weights in (fp16, bf16 or fp32; its first floating tensor's)."""
    from safetensors import safe_open

    names = {"F16": "fp16", "BF16": "bf16", "F32": "fp32"}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            dtype = f.get_slice(key).get_dtype()
            if dtype in names and not key.endswith(".alpha"):
                return names[dtype]
    return "fp32"


def read_lora(path: Path, with_tensors: bool = True) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Tensors (float32; none unless `with_tensors`) and metadata of a LoRA file, with a clear error for
    what is not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"LoRA file not found: {path}")
    if path.suffix != ".safetensors":
        raise ModelError(f"{path.name}: only .safetensors LoRA files are read (pickles can run code).")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k).float() for k in f.keys()} if with_tensors else {}
    except Exception as e:  # safetensors raises several types for a damaged header
        raise ModelError(f"{path.name} is not a readable .safetensors file ({e}).") from None
    return tensors, metadata


def load_lora_file(components: Any, path: Path, dropout: float = 0.0,
                   trainable: bool = False) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
    """Read a LoRA file in any supported spelling and wrap `components` with it (lora.load_lora_into)."""
    from .lora import load_lora_into

    tensors, _ = read_lora(Path(path))
    kohya = to_kohya(tensors, components.family, len(components.text_encoders), unet_config=components.unet.config)
    if components.family == "flux":  # the hosts' fused modules → the split ones training wraps
        from .flux_layout import kohya_to_split

        kohya = kohya_to_split(kohya)
    return load_lora_into(components, kohya, dropout, trainable)


def update_metadata(path: Path, changes: Mapping[str, str]) -> Path:
    """Merge `changes` into a .safetensors file's metadata, atomically. Only the header is rewritten: the tensor
    bytes are copied as they are, so the weights (and `sshs_model_hash`, a hash of those bytes) never change."""
    path = Path(path)
    read_lora(path, with_tensors=False)  # a clear ModelError for what is not a readable .safetensors file
    with open(path, "rb") as src:
        (header_len,) = struct.unpack("<Q", src.read(8))
        header = json.loads(src.read(header_len))
        header["__metadata__"] = {**(header.get("__metadata__") or {}), **{k: str(v) for k, v in changes.items()}}
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)  # the data stays 8-byte aligned, as safetensors writes it

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as out:
                out.write(struct.pack("<Q", len(blob)) + blob)
                src.seek(8 + header_len)
                shutil.copyfileobj(src, out, 1 << 20)

        atomic_write_with(path, write)
    return path


def usage_hint(name: str, weight: float, trigger: str = "") -> str:
    """`modelspec.usage_hint`: `<lora:name:weight> trigger`."""
    return f"<lora:{name}:{weight:g}>" + (f" {trigger}" if trigger else "")


def write_usage_weight(path: Path, weight: float, trigger: str = "") -> str:
    """Put `weight` into the file's `modelspec.usage_hint` (the name and words around the `<lora:…>` tag are kept;
    a file without one gets `usage_hint(file stem, weight, trigger)`); returns the new hint."""
    old = read_lora(Path(path), with_tensors=False)[1].get("modelspec.usage_hint", "")
    tag = _LORA_TAG.search(old)
    hint = (old[:tag.start()] + f"<lora:{tag.group(1)}:{weight:g}>" + old[tag.end():] if tag
            else usage_hint(Path(path).stem, weight, trigger))
    update_metadata(Path(path), {"modelspec.usage_hint": hint})
    return hint


_LORA_TAG = re.compile(r"<lora:([^:>]+):[^>]*>")


def peft_alpha(lora_path: Path) -> Optional[float]:
    """The alpha peft saves beside its weights (`adapter_config.json`), None when there is none."""
    import json

    config = Path(lora_path).with_name("adapter_config.json")
    if not config.is_file():
        return None
    saved = json.loads(config.read_text(encoding="utf-8"))
    return saved.get("lora_alpha", saved.get("alpha"))  # LoraConfig's name; LoHaConfig's and LoKrConfig's


def to_kohya(tensors: Mapping[str, torch.Tensor], family: str, num_text_encoders: int,
             default_alpha: Optional[float] = None, unet_config: Any = None) -> Dict[str, torch.Tensor]:
    """Any supported LoRA spelling → kohya keys (down/up/alpha, and dora_scale for DoRA), keeping alpha = rank
    when absent.

    peft/diffusers files carry no alpha: `default_alpha` (peft's adapter_config lora_alpha) is
    used when given, else alpha = rank, which is what those loaders assume (scale 1). peft's DoRA
    `lora_magnitude_vector` becomes kohya's (out, 1, …) dora_scale (dora.py).
    SDXL kohya files written with CompVis block names are mapped with diffusers' own table.
    """
    from .dora import kohya_scale
    from .flux_layout import flux_to_kohya

    modules: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        split = keymap.split_lora_key(key)
        if split is not None:
            modules.setdefault(split[0], {})[split[1]] = value
    if family == "flux":
        return flux_to_kohya(modules, default_alpha)
    te_prefixes = keymap.text_encoder_prefixes(family, num_text_encoders)
    parts: Dict[str, Dict[str, torch.Tensor]] = {}
    for module, found in modules.items():
        name = keymap.foreign_to_kohya(module, te_prefixes)
        if name is not None:
            parts.setdefault(name, {}).update(found)
    if any(k.startswith(("lora_unet_input_blocks", "lora_unet_output_blocks", "lora_unet_middle_block"))
           for k in parts):
        parts = _compvis_unet_names(parts, unet_config or _SdxlUnetConfig())
    out: Dict[str, torch.Tensor] = {}
    for name, p in parts.items():
        lycoris = {part: t for part, t in p.items() if part in ALL_PARTS}
        if lycoris:  # LoHa/LoKr: the factors as they are; no alpha scales by 1 (the hosts' rule, lycoris.delta)
            out.update({f"{name}.{part}": t for part, t in lycoris.items()})
            alpha = p.get("alpha", torch.tensor(float(default_alpha)) if default_alpha else None)
            if alpha is not None:
                out[f"{name}.alpha"] = alpha.reshape(())
            continue
        if "down" not in p or "up" not in p:
            continue
        out[f"{name}.lora_down.weight"] = p["down"]
        out[f"{name}.lora_up.weight"] = p["up"]
        rank = p["down"].shape[0]
        alpha = p["alpha"] if "alpha" in p else torch.tensor(float(default_alpha or rank))
        out[f"{name}.alpha"] = alpha.reshape(())
        if "magnitude" in p:
            out[f"{name}.dora_scale"] = kohya_scale(p["magnitude"], p["down"].dim())
        elif "dora_scale" in p:
            out[f"{name}.dora_scale"] = p["dora_scale"]
    if not out:
        raise ModelError("No LoRA weights found: expected kohya (lora_unet_…lora_down.weight) or "
                         "peft/diffusers (unet.…lora_A.weight) keys.")
    return out


def _compvis_unet_names(parts: Dict[str, Dict[str, torch.Tensor]], unet_config: Any) -> Dict[str, Dict[str, torch.Tensor]]:
    """kohya SDXL files name UNet blocks the CompVis way (input_blocks_4_1_...): map to diffusers."""
    try:
        from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers
    except ImportError:  # pragma: no cover - every supported diffusers has it
        raise ModelError("This LoRA uses CompVis block names, which need diffusers >= 0.31 to read.") from None
    flat = {f"{name}.{part}": t for name, p in parts.items() for part, t in p.items()}
    mapped = _maybe_map_sgm_blocks_to_diffusers(flat, unet_config)
    out: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, t in mapped.items():
        name, _, part = key.rpartition(".")
        out.setdefault(name, {})[part] = t
    return out


class _SdxlUnetConfig:
    # _maybe_map_sgm_blocks_to_diffusers reads only layers_per_block from the UNet config.
    layers_per_block = 2
