"""What the UNet predicts: noise (epsilon) or velocity (v_prediction)."""

from __future__ import annotations

from collections.abc import Collection

from ..errors import ModelError

PREDICTION_TYPES = ("epsilon", "v_prediction")


def check_prediction_type(value: str) -> str:
    if value not in ("auto", *PREDICTION_TYPES):
        raise ModelError(f"prediction_type must be auto, epsilon or v_prediction, not {value!r}.")
    return value


def guess_from_checkpoint(keys: Collection[str], family: str, unet) -> str:
    """A `v_pred` marker key (SDXL v models, ComfyUI's convention) wins; SD2 is probed; the rest is epsilon."""
    if "v_pred" in keys:
        return "v_prediction"
    if family == "sd2":
        return "v_prediction" if unet_predicts_v(unet) else "epsilon"
    return "epsilon"


def unet_predicts_v(unet) -> bool:
    """A1111's probe for SD2 (`is_using_v_parameterization_for_sd2`), on the diffusers UNet.

    At t=999 the input is almost pure noise: an epsilon model returns about the input, a v model
    about its negative, so the mean of (output - input) is far below -1 only for v models.
    """
    import torch

    param = next(unet.parameters())
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, device=param.device, dtype=param.dtype)
    context = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, device=param.device, dtype=param.dtype)
    t = torch.tensor([999], device=param.device)
    with torch.no_grad():
        out = unet(x, t, encoder_hidden_states=context).sample
    return (out.float() - x.float()).mean().item() < -1
