"""Models from an original-layout (single-file) state dict: a `.safetensors`/`.ckpt` file or a host's weights.

UNet and VAE go through diffusers' own converters (`convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`: same signature from diffusers 0.31 to 0.42, unlike
`from_single_file`, whose config handling changed between them); the text encoders through the
table in `text_convert`.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ModelError
from . import factory
from .checkpoint_file import CheckpointFile
from .detect import TEXT_ENCODERS, UNET_PREFIX, VAE_PREFIX
from .shipped import FAMILY_NAMES, load_configs, text_encoder_parts, variants
from .text_convert import clip_l_from_ldm, match_model_layout, open_clip_from_ldm

if TYPE_CHECKING:
    import torch

CKPT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def read_checkpoint(path: Path, allow_ckpt: bool) -> Mapping[str, torch.Tensor]:
    """The tensors of a `.safetensors` file (read one by one when taken), or of a pickle when the user opted in."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return CheckpointFile(path)
    if suffix in CKPT_SUFFIXES:
        if not allow_ckpt:
            raise ModelError(
                f"{path} is a pickle ({suffix}), which can run code when loaded. Use the .safetensors version of "
                "the model, or set allow_ckpt: true if you trust the file (it is then loaded with "
                "weights_only=True)."
            )
        return _read_pickle(path)
    raise ModelError(
        f"{path} is neither a .safetensors checkpoint nor a diffusers folder. Give a .safetensors file "
        "(or a .ckpt with allow_ckpt: true) or a folder holding model_index.json."
    )


def _read_pickle(path: Path) -> dict:
    import torch

    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelError(
            f"Cannot load {path} safely: {err}. The pickle holds more than tensors; convert it to .safetensors "
            "with a tool you trust."
        ) from err
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ModelError(f"{path} holds a {type(data).__name__}, not a state dict of tensors.")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def select_variant(family: str, sd: Mapping[str, torch.Tensor]) -> str:
    """The shipped architecture whose UNet input conv has the checkpoint's shape (`base` for real models)."""
    key = UNET_PREFIX + "input_blocks.0.0.weight"
    if key not in sd:
        raise ModelError(
            f"The checkpoint has no UNet weights ({key} is missing): give a full {FAMILY_NAMES[family]} checkpoint."
        )
    got = tuple(sd[key].shape)
    for variant in variants(family):
        unet = load_configs(family, variant)["unet"]
        if got == (unet["block_out_channels"][0], unet["in_channels"], 3, 3):
            return variant
    raise ModelError(
        f"The UNet of this {FAMILY_NAMES[family]} checkpoint has an input layer of shape {got}, which no supported "
        "architecture has (inpainting and instruct-pix2pix models have 8 or 9 input channels). Give a standard "
        "text-to-image checkpoint, or check model_family."
    )


def _part(sd: MutableMapping, prefix: str, take: bool, dtype: torch.dtype,
          matrix_dtype: torch.dtype | None = None) -> dict:
    """The entries under `prefix`. When we own `sd` they are removed from it and cast one by one as they are
    taken (a file's tensors as they are read), so a part never exists twice and each source tensor is freed
    at once; with `matrix_dtype`, layer weights (2-D or 4-D `.weight`s that are not embeddings) go straight to
    it, so an fp8 model never exists in half precision first."""
    keys = [k for k in sd if k.startswith(prefix)]
    if not take:
        return {k: sd[k] for k in keys}
    out = {}
    for key in keys:
        shape = sd.shape(key) if isinstance(sd, CheckpointFile) else tuple(sd[key].shape)
        target = matrix_dtype if matrix_dtype is not None and _is_layer_weight(key, shape) else dtype
        if isinstance(sd, CheckpointFile):
            tensor = sd.read(key, target)
            del sd[key]
        else:
            tensor = sd.pop(key)
            tensor = tensor.to(target) if tensor.is_floating_point() else tensor
        out[key] = tensor
    return out


def _is_layer_weight(key: str, shape: tuple) -> bool:
    return key.endswith(".weight") and len(shape) in (2, 4) and "embedding" not in key


def models_from_ldm(sd: MutableMapping[str, torch.Tensor], family: str, dtype: torch.dtype, copy: bool,
                    vae_dtype: torch.dtype | None = None, matrix_dtype: torch.dtype | None = None) -> dict:
    """{"unet", "vae", "text_encoders", "configs", "variant"} built from an original-layout state dict.

    copy=False means the caller hands `sd` over (a `CheckpointFile`, or tensors made for us): its
    entries are consumed tensor by tensor, so loading holds the models plus one tensor (an SDXL file
    in fp16 is 7 GB; its float32 models another 14). copy=True leaves `sd` and its tensors alone.
    The VAE is built in `vae_dtype` (default: `dtype`); the UNet's and text encoders' Linear/Conv2d
    weights in `matrix_dtype` when given (fp8 base weights, quantized part by part as they load).
    """
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    variant = select_variant(family, sd)
    configs = load_configs(family, variant)
    if not copy:  # drop what is never used (EMA copies, schedule buffers) before memory fills up
        used = (UNET_PREFIX, VAE_PREFIX, *(prefix for prefix, _ in TEXT_ENCODERS[family]))
        for key in [k for k in sd if not k.startswith(used)]:
            del sd[key]
    unet = factory.build_unet(configs["unet"], empty=True)
    converted = convert_ldm_unet_checkpoint(_part(sd, UNET_PREFIX, not copy, dtype, matrix_dtype), configs["unet"])
    factory.load_weights(unet, converted, "UNet", dtype, copy, matrix_dtype)
    del converted

    vae_dtype = vae_dtype or dtype
    vae_sd = _part(sd, VAE_PREFIX, not copy, vae_dtype)
    if not vae_sd:
        raise ModelError("The checkpoint has no VAE weights (first_stage_model.*): give a full checkpoint.")
    vae = factory.build_vae(configs["vae"], empty=True)
    factory.load_weights(vae, convert_ldm_vae_checkpoint(vae_sd, configs["vae"]), "VAE", vae_dtype, copy)
    del vae_sd

    encoders = []
    for part, (prefix, layout) in zip(text_encoder_parts(family), TEXT_ENCODERS[family]):
        config = configs[part]
        source = _part(sd, prefix, not copy, dtype, matrix_dtype)
        if layout == "clip_l":
            hf_sd = clip_l_from_ldm(source, prefix)
        else:
            hf_sd = open_clip_from_ldm(source, prefix, config["num_hidden_layers"],
                                       factory.text_encoder_has_projection(config), consume=not copy)
        model = factory.build_text_encoder(config, empty=True)
        hf_sd = match_model_layout(hf_sd, model.state_dict().keys())
        encoders.append(factory.load_weights(model, hf_sd, f"text encoder ({prefix}*)", dtype, copy, matrix_dtype))
    return {"unet": unet, "vae": vae, "text_encoders": encoders, "configs": configs, "variant": variant}
