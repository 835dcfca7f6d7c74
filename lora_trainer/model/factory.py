"""Build the diffusers / transformers models from config dicts and fill them with weights.

Every import of torch, diffusers and transformers happens inside a function, so importing the
package costs nothing. Models built to receive a checkpoint skip random initialisation (accelerate's
`init_empty_weights`, used the same way by diffusers and transformers themselves); the weights are
then assigned, converted to the requested dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from ..errors import ModelError

if TYPE_CHECKING:
    import torch

# Buffers some transformers versions store and others recompute: never required from a checkpoint.
OPTIONAL_KEYS = ("position_ids",)


@contextlib.contextmanager
def weights_skipped(empty: bool) -> Iterator[None]:
    """Build parameters on the meta device (no random init) when accelerate is there; buffers stay real."""
    if empty:
        try:
            from accelerate import init_empty_weights
        except ImportError:  # plain init: slower, same result once the weights are loaded
            empty = False
    if not empty:
        yield
        return
    with init_empty_weights(include_buffers=False):
        yield


def build_unet(config: Mapping, empty: bool = False):
    from diffusers import UNet2DConditionModel

    with weights_skipped(empty):
        return UNet2DConditionModel.from_config(dict(config))


def build_vae(config: Mapping, empty: bool = False):
    from diffusers import AutoencoderKL

    with weights_skipped(empty):
        return AutoencoderKL.from_config(dict(config))


def text_encoder_has_projection(config: Mapping) -> bool:
    return "CLIPTextModelWithProjection" in (config.get("architectures") or [])


def build_text_encoder(config: Mapping, empty: bool = False):
    """CLIPTextModel, or CLIPTextModelWithProjection when the config names it (SDXL's second encoder)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if text_encoder_has_projection(config) else CLIPTextModel
    with weights_skipped(empty):
        return cls(CLIPTextConfig.from_dict(dict(config)))


def build_scheduler(config: Mapping, prediction_type: str):
    """The training scheduler (DDPM) with the model's betas and prediction type."""
    from diffusers import DDPMScheduler

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config["prediction_type"] = prediction_type
    return DDPMScheduler.from_config(config)


def _owns_its_storage(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() == t.numel() * t.element_size()


def load_weights(model, state_dict: Mapping[str, torch.Tensor], what: str, dtype: torch.dtype,
                 copy: bool = False, matrix_dtype: torch.dtype | None = None):
    """Put `state_dict` (already in the model's own key names) into `model`, as `dtype` on the CPU.

    `copy=True` guarantees the model shares no memory with the caller's tensors (a host's weights
    handed over in memory must never be changed by training). Views into larger tensors (split
    qkv, squeezed convs) are copied too, so the model can be saved with safetensors.
    `matrix_dtype` (fp8 base weights): Linear and Conv2d weights are stored in it instead; with
    copy=False `state_dict` is then emptied as it goes, so each source tensor is freed once cast.
    Raises ModelError for missing weights or wrong shapes, naming the part (`what`).
    """
    import torch

    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not k.endswith(OPTIONAL_KEYS)]
    if missing:
        raise ModelError(
            f"The checkpoint's {what} is incomplete: {len(missing)} weights are missing (e.g. {missing[:3]}). "
            "The file may be truncated, or it is not a full Stable Diffusion checkpoint (a LoRA, a VAE or a "
            "UNet alone?). Give a full checkpoint of one of the supported families."
        )
    wrong = [(k, tuple(state_dict[k].shape), tuple(v.shape)) for k, v in own.items()
             if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if wrong:
        key, got, want = wrong[0]
        raise ModelError(
            f"The checkpoint's {what} has another architecture than expected: {key} has shape {got}, expected "
            f"{want} ({len(wrong)} weights differ). Inpainting, instruct-pix2pix, refiner and other variant "
            "models are not supported: give a standard text-to-image checkpoint, or set model_family."
        )
    matrices = matrix_weights(model) if matrix_dtype is not None else set()
    consume = matrix_dtype is not None and not copy and isinstance(state_dict, dict)
    tensors = {}
    for key in own:
        if key not in state_dict:
            continue
        t = state_dict.pop(key) if consume else state_dict[key]
        target = (matrix_dtype if key in matrices else dtype) if t.is_floating_point() else t.dtype
        if t.dtype == matrix_dtype and key not in matrices:  # quantized while read but not a layer weight
            raise ModelError(f"The checkpoint's {what} has {key} where a layer weight was expected; set "
                             "base_precision to auto for this model.")
        must_copy = copy or not _owns_its_storage(t)
        tensors[key] = t.to(device="cpu", dtype=target, copy=must_copy).contiguous()
        del t
    model.load_state_dict(tensors, strict=False, assign=True)
    left = [name for name, p in model.named_parameters() if p.device == torch.device("meta")]
    if left:  # cannot happen after the checks above; fail loudly rather than train on empty tensors
        raise ModelError(f"The checkpoint's {what} left {len(left)} weights unset (e.g. {left[:3]}).")
    return (model if matrices else cast(model, dtype)).eval()


def matrix_weights(model) -> set:
    """Names of the Linear and Conv2d weights of `model`: what base_precision fp8 stores in float8."""
    from torch import nn

    return {f"{name}.weight" if name else "weight" for name, m in model.named_modules()
            if type(m) in (nn.Linear, nn.Conv2d)}


def cast(model, dtype: torch.dtype):
    """`model.to(dtype)` where something differs, with torch's own .to() (diffusers' warns on every cast)."""
    import itertools

    import torch

    if any(t.is_floating_point() and t.dtype != dtype for t in itertools.chain(model.parameters(), model.buffers())):
        torch.nn.Module.to(model, dtype=dtype)
    return model
