"""The optimizers a config can name (`optimizer:` in config.OPTIMIZERS). A new optimizer goes here: its
import (optional libraries are imported only when chosen, with a message naming what to install), and its
parameter groups."""

from __future__ import annotations

import torch

from ..config import TrainConfig
from ..errors import ConfigError


def make_optimizer(cfg: TrainConfig, unet_params, te_params, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer `cfg.optimizer` names, over the UNet's LoRA parameters and (own learning rate) the text encoders'."""
    groups = [{"params": unet_params, "lr": cfg.learning_rate}]
    if te_params:
        groups.append({"params": te_params, "lr": cfg.text_encoder_lr or cfg.learning_rate})
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("optimizer: adamw8bit needs bitsandbytes, which is not installed. "
                              "Use optimizer: adamw, or install bitsandbytes yourself.") from None
        return bnb.optim.AdamW8bit(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=fused)
