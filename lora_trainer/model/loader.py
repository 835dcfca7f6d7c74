"""`load_components`: a base model from a file, a diffusers folder or a host's weights in memory."""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Union

from ..errors import ModelError
from . import factory
from .components import Components
from .detect import detect_family, normalize_keys
from .flux import is_flux, is_flux_file, load_flux
from .folder import folder_family, folder_scheduler_config, is_diffusers_folder, models_from_folder
from .hashing import file_sha256, state_dict_fingerprint
from .prediction import check_prediction_type, guess_from_checkpoint
from .shipped import FAMILIES, PAD_TOKENS, SUPPORTED, load_config
from .single_file import models_from_ldm, read_checkpoint
from .tokenizers import load_clip_tokenizer

if TYPE_CHECKING:
    import torch

BaseModel = Union[str, "os.PathLike[str]", Mapping[str, "torch.Tensor"]]


class HandedOver(dict):
    """A state dict whose tensors were made for the trainer (e.g. CPU copies of a host's GPU weights): the
    loader consumes it tensor by tensor instead of copying it, so the copy becomes the training copy."""


WHERE_TO_PUT = (
    "Put the checkpoint in models/Stable-diffusion/ (A1111/Forge) or models/checkpoints/ (ComfyUI), "
    "or give the full path to a .safetensors file or a diffusers folder."
)
# Scheduler settings a diffusers folder may carry and the training scheduler takes over.
_SCHEDULER_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                   "steps_offset", "timestep_spacing", "rescale_betas_zero_snr")


def load_components(base_model: BaseModel, family: str = "auto", prediction_type: str = "auto",
                    allow_ckpt: bool = False, name: str | None = None,
                    dtype: torch.dtype | None = None, vae_dtype: torch.dtype | None = None,
                    matrix_dtype: torch.dtype | None = None, flux_parts: Mapping[str, str] | None = None) -> Components:
    """Load a Stable Diffusion base model for training, on the CPU: UNet and text encoders in `dtype` (float32
    default), the VAE in `vae_dtype` (default: `dtype`). A file is read tensor by tensor, each cast as it is read.
    `matrix_dtype` (single files and state dicts): the UNet's and text encoders' Linear/Conv2d weights in that
    dtype (fp8 base weights), the rest in `dtype`. A Flux.1 transformer file also needs `flux_parts`
    ({"clip_l", "t5xxl", "vae", "t5_tokenizer"}: paths; flux.py).

    base_model: a single-file checkpoint (.safetensors; .ckpt only with allow_ckpt) in the original
    layout, a diffusers folder, or a state dict in the original layout (what A1111/Forge hold; left
    untouched unless it is a `HandedOver`, which is consumed).
    family: "auto" detects sd1/sd2/sdxl from the keys (or the folder's configs).
    prediction_type: "auto" reads a `v_pred` marker or the folder's scheduler, and probes SD2 UNets
    the way A1111 does; else "epsilon" or "v_prediction".
    Raises ModelError with a message saying what to fix.
    """
    import torch

    dtype = dtype or torch.float32
    check_prediction_type(prediction_type)
    if family not in ("auto", "flux", *FAMILIES):
        raise ModelError(f"model_family must be auto, sd1, sd2 or sdxl, not {family!r}.")
    vae_dtype = vae_dtype or dtype
    flux = {"parts": flux_parts or {}, "dtype": dtype, "vae_dtype": vae_dtype, "matrix_dtype": matrix_dtype,
            "name": name}
    if isinstance(base_model, Mapping) and is_flux(base_model):  # a host's Flux MODEL, CLIP and VAE
        check_flux_family("The model", family, prediction_type)
        return load_flux(base_model, consume=isinstance(base_model, HandedOver), **flux)
    if isinstance(base_model, Mapping):
        return _from_state_dict(base_model, family, prediction_type, name or "in-memory", "<in-memory>",
                                None, dtype, vae_dtype, copy=not isinstance(base_model, HandedOver),
                                matrix_dtype=matrix_dtype)
    path = base_model_path(base_model)
    if is_flux_file(path):
        check_flux_family(path.name, family, prediction_type)
        return load_flux(str(path), **flux)
    if family == "flux":
        raise ModelError(f"model_family is flux, but {path} is not a Flux.1 transformer .safetensors file "
                         "(flux1-dev.safetensors, in the original layout).")
    if path.is_dir():
        return _from_folder(path, family, prediction_type, name or path.name, dtype, vae_dtype)
    return _from_state_dict(read_checkpoint(path, allow_ckpt), family, prediction_type, name or path.stem,
                            str(path), path, dtype, vae_dtype, copy=False, matrix_dtype=matrix_dtype)


def base_model_path(base_model: object) -> Path:
    """The checkpoint file or diffusers folder `base_model` names, checked without reading it; else the
    ModelError that names what is missing and where to put it."""
    if not isinstance(base_model, (str, os.PathLike)):
        raise ModelError(f"base_model must be a path or a state dict, not {type(base_model).__name__}.")
    if not os.fspath(base_model).strip():
        raise ModelError(f"base_model is empty. {WHERE_TO_PUT}")
    path = Path(base_model).expanduser()
    if not path.exists():
        raise ModelError(f"Base model not found: {path}. {WHERE_TO_PUT}")
    if path.is_dir() and not is_diffusers_folder(path):
        raise ModelError(f"{path} is a folder but not a diffusers model (no model_index.json). {WHERE_TO_PUT}")
    return path


def check_flux_family(what: str, family: str, prediction_type: str) -> None:
    if family not in ("auto", "flux") or prediction_type != "auto":
        raise ModelError(f"{what} is a Flux.1 transformer: leave model_family and prediction_type at auto "
                         "(they are for SD models).")


def _from_state_dict(sd: Mapping, family: str, prediction_type: str, name: str, source: str,
                     path: Path | None, dtype: torch.dtype, vae_dtype: torch.dtype, copy: bool,
                     matrix_dtype: torch.dtype | None = None) -> Components:
    """copy=False: `sd` is ours (a file, or handed over) and is consumed; copy=True: a host's, left untouched."""
    sd = normalize_keys(sd)
    if family == "auto":
        family = detect_family(sd.keys())
    markers = {k for k in ("v_pred", "ztsnr") if k in sd}
    # A file's sha256 reads every byte: on another core, while the models load and train (metadata waits for it).
    model_hash = _hasher().submit(file_sha256, path) if path is not None else state_dict_fingerprint([sd])
    models = models_from_ldm(sd, family, dtype, copy, vae_dtype, matrix_dtype)
    if prediction_type == "auto":
        prediction_type = guess_from_checkpoint(markers, family, models["unet"])
    configs = models["configs"]
    if "ztsnr" in markers:  # trained with zero terminal SNR (e.g. NoobAI v-pred): train the same way
        configs["scheduler"]["rescale_betas_zero_snr"] = True
    return Components(
        family=family, unet=models["unet"], vae=models["vae"], text_encoders=models["text_encoders"],
        tokenizers=[load_clip_tokenizer(pad) for pad in PAD_TOKENS[family]],
        noise_scheduler=factory.build_scheduler(configs["scheduler"], prediction_type),
        prediction_type=prediction_type, name=name, model_hash=model_hash, source=source,
        variant=models["variant"],
    )


@lru_cache(maxsize=1)
def _hasher():
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-trainer-hash")


def _from_folder(path: Path, family: str, prediction_type: str, name: str, dtype: torch.dtype,
                 vae_dtype: torch.dtype) -> Components:
    detected = folder_family(path)
    if family == "auto":
        family = detected
    elif family != detected:
        raise ModelError(f"{path} holds an {detected} model, but model_family is {family}: set it to auto.")
    models = models_from_folder(path, family, dtype, vae_dtype)
    folder_scheduler = folder_scheduler_config(path)
    if prediction_type == "auto":
        prediction_type = folder_scheduler.get("prediction_type") or guess_from_checkpoint((), family, models["unet"])
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ModelError(f"{path}: the scheduler's prediction_type {prediction_type!r} is not supported; "
                             f"set prediction_type to epsilon or v_prediction. Supported models: {SUPPORTED}.")
    scheduler_config = load_config(family, "scheduler")
    scheduler_config.update({k: folder_scheduler[k] for k in _SCHEDULER_KEYS if k in folder_scheduler})
    tokenizers = [load_clip_tokenizer(pad, folder) for pad, folder in zip(PAD_TOKENS[family], models["tokenizer_dirs"])]
    return Components(
        family=family, unet=models["unet"], vae=models["vae"], text_encoders=models["text_encoders"],
        tokenizers=tokenizers, noise_scheduler=factory.build_scheduler(scheduler_config, prediction_type),
        prediction_type=prediction_type, name=name,
        model_hash=state_dict_fingerprint(m.state_dict() for m in [models["unet"], models["vae"],
                                                                    *models["text_encoders"]]),
        source=str(path), variant="diffusers",
    )
