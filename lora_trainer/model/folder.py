"""Models from a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ModelError
from .factory import cast
from .shipped import FAMILY_NAMES

if TYPE_CHECKING:
    import torch

_WEIGHT_STEMS = ("diffusion_pytorch_model", "model")


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file())


def folder_family(path: Path) -> str:
    """sdxl if there is a second text encoder; sd2 if the encoder is OpenCLIP (gelu); else sd1."""
    if (path / "text_encoder_2" / "config.json").is_file():
        return "sdxl"
    config = _read_json(path / "text_encoder" / "config.json")
    return "sd2" if config.get("hidden_act") == "gelu" else "sd1"


def folder_scheduler_config(path: Path) -> dict:
    """The folder's scheduler config ({} if absent): its betas and prediction type are the model's."""
    file = path / "scheduler" / "scheduler_config.json"
    return _read_json(file) if file.is_file() else {}


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ModelError(f"The diffusers folder lacks {file}: copy the complete model folder.") from err
    except (OSError, ValueError) as err:
        raise ModelError(f"Cannot read {file}: {err}") from err


def _variant(sub: Path) -> str | None:
    """"fp16" when the folder only holds `*.fp16.safetensors` weights (diffusers' variant naming)."""
    names = {p.name for p in sub.glob("*.safetensors")} | {p.name for p in sub.glob("*.bin")}
    if any(n in names for stem in _WEIGHT_STEMS for n in (f"{stem}.safetensors", f"{stem}.bin")):
        return None
    return "fp16" if any(".fp16." in n for n in names) else None


def models_from_folder(path: Path, family: str, dtype: torch.dtype, vae_dtype: torch.dtype | None = None) -> dict:
    """{"unet", "vae", "text_encoders", "tokenizer_dirs"} loaded with local_files_only (never the network).

    UNet and text encoders in `dtype`, the VAE in `vae_dtype` (default: `dtype`)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    parts = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]
    for sub in ["unet", "vae", *parts]:
        if not (path / sub / "config.json").is_file():
            raise ModelError(
                f"{path} is not a complete {FAMILY_NAMES[family]} diffusers folder: {sub}/config.json is missing."
            )
    try:
        unet = UNet2DConditionModel.from_pretrained(str(path / "unet"), local_files_only=True,
                                                    variant=_variant(path / "unet"), torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(str(path / "vae"), local_files_only=True, variant=_variant(path / "vae"),
                                            torch_dtype=vae_dtype or dtype)
        encoders = []
        for part in parts:
            config = _read_json(path / part / "config.json")
            with_projection = "CLIPTextModelWithProjection" in (config.get("architectures") or [])
            cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
            encoders.append(cls.from_pretrained(str(path / part), local_files_only=True, variant=_variant(path / part)))
    except (OSError, ValueError, RuntimeError) as err:
        raise ModelError(f"Cannot load the diffusers folder {path}: {err}") from err
    # transformers 5 keeps the file's dtype unless told, and is told differently than 4.x: cast after
    models = [cast(m, dtype).eval() for m in (unet, *encoders)]
    models.insert(1, cast(vae, vae_dtype or dtype).eval())
    tokenizer_dirs = [path / name for name in (["tokenizer", "tokenizer_2"][: len(parts)])]
    return {"unet": models[0], "vae": models[1], "text_encoders": models[2:], "tokenizer_dirs": tokenizer_dirs}
