"""The optimizers a config can name (`optimizer:` in config.OPTIMIZERS), their learning-rate schedules and LoRA+.

A new optimizer goes in OPTIMIZERS below: where its class is, the package that ships it (imported only when
chosen; missing, it is one line naming the pip command: nothing is installed into a host), and the arguments
the config gives it. `optimizer_args` are checked against the class's own signature. Schedule-free AdamW keeps
two sets of weights: `evaluating()` switches it to the averaged ones around validation, sampling and saving,
as its authors require.
"""

from __future__ import annotations

import importlib
import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional

import torch

from ..config import TrainConfig
from ..errors import ConfigError


@dataclass(frozen=True)
class OptimizerKind:
    where: str                  # "module:Class"
    package: Optional[str]      # the pip package, None when it comes with what lora-scripts needs anyway
    state_bytes: float          # optimizer state per trained parameter (the memory plan counts it)
    own_lr: bool = False        # adafactor's relative step: no learning rate of ours


OPTIMIZERS: Dict[str, OptimizerKind] = {
    "adamw": OptimizerKind("torch.optim:AdamW", None, 8),  # two fp32 moments
    "adamw8bit": OptimizerKind("bitsandbytes.optim:AdamW8bit", "bitsandbytes", 2),
    "prodigy": OptimizerKind("prodigyopt:Prodigy", "prodigyopt", 16),  # two moments, s and the start p0
    "adafactor": OptimizerKind("transformers.optimization:Adafactor", None, 1, own_lr=True),  # factored, no momentum
    "came": OptimizerKind("came_pytorch:CAME", "came-pytorch", 5),  # a moment, factored second moments
    "lion": OptimizerKind("lion_pytorch:Lion", "lion-pytorch", 4),  # one moment
    "adamw_schedulefree": OptimizerKind("schedulefree:AdamWScheduleFree", "schedulefree", 8),  # z, second moment
}


def optimizer_class(name: str) -> Any:
    kind = OPTIMIZERS[name]
    module, _, cls = kind.where.partition(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError:
        hint = ("install bitsandbytes yourself (a host's own build: lora-scripts never installs it)"
                if kind.package == "bitsandbytes" else f"python -m pip install {kind.package}")
        raise ConfigError(f"optimizer: {name} needs the {kind.package} package, which is not installed: {hint}, "
                          "or use optimizer: adamw.") from None


def param_groups(cfg: TrainConfig, unet_params: List[torch.nn.Parameter], te_params: List[torch.nn.Parameter],
                 up_ids: frozenset = frozenset()) -> List[Dict[str, Any]]:
    """The UNet's LoRA parameters at learning_rate, the text encoders' at text_encoder_lr; with loraplus_lr_ratio
    the up matrices (`up_ids`: their ids) of each in a group of their own at that multiple (LoRA+)."""
    groups: List[Dict[str, Any]] = []
    for params, lr in ((unet_params, cfg.learning_rate), (te_params, cfg.text_encoder_lr or cfg.learning_rate)):
        if not params:
            continue
        if cfg.loraplus_lr_ratio:
            ups = [p for p in params if id(p) in up_ids]
            rest = [p for p in params if id(p) not in up_ids]
            groups += [{"params": rest, "lr": lr}, {"params": ups, "lr": lr * cfg.loraplus_lr_ratio}]
        else:
            groups.append({"params": params, "lr": lr})
    return [g for g in groups if g["params"]]


def make_optimizer(cfg: TrainConfig, unet_params, te_params, device: torch.device,
                   up_ids: frozenset = frozenset()) -> torch.optim.Optimizer:
    """The optimizer `cfg.optimizer` names over the run's LoRA parameters, with `optimizer_args` checked."""
    kind, cls = OPTIMIZERS[cfg.optimizer], optimizer_class(cfg.optimizer)
    groups = param_groups(cfg, unet_params, te_params, up_ids)
    args: Dict[str, Any] = {"lr": cfg.learning_rate, "weight_decay": cfg.weight_decay}
    if cfg.optimizer == "adamw":
        args["fused"] = device.type == "cuda"
    if cfg.optimizer == "adamw_schedulefree":
        args["warmup_steps"] = cfg.lr_warmup_steps
    args.update(cfg.optimizer_args)
    if kind.own_lr and args.get("relative_step", True):
        args["lr"] = None  # Adafactor's relative step sets the rate itself
        for group in groups:
            group.pop("lr")
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "params")]
    unknown = sorted(set(cfg.optimizer_args) - set(accepted))
    if unknown:
        raise ConfigError(f"optimizer_args {', '.join(unknown)}: not an argument of {cfg.optimizer} "
                          f"({cls.__module__}.{cls.__name__}); it takes {', '.join(accepted)}.")
    try:
        optimizer = cls(groups, **args)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"optimizer {cfg.optimizer} refused its arguments {cfg.optimizer_args}: {err}") from None
    train_mode(optimizer)
    return optimizer


def make_lr_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    """The schedule cfg.lr_scheduler names; Adafactor's relative step reports its own (transformers')."""
    if OPTIMIZERS[cfg.optimizer].own_lr and cfg.optimizer_args.get("relative_step", True):
        from transformers.optimization import AdafactorSchedule

        return AdafactorSchedule(optimizer)
    from diffusers.optimization import get_scheduler

    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                         num_training_steps=total_steps)


def effective_lr(optimizer: torch.optim.Optimizer, lr_scheduler: Any) -> float:
    """The step size the first group really takes: Prodigy's d × lr, else the schedule's rate."""
    group = optimizer.param_groups[0]
    if "d" in group and group.get("lr") is not None:
        return float(group["d"] * group["lr"])
    return float(lr_scheduler.get_last_lr()[0])


def train_mode(optimizer: torch.optim.Optimizer) -> None:
    """Schedule-free optimizers step on their training weights: switched to them before a step is taken."""
    if callable(getattr(optimizer, "train", None)):
        optimizer.train()


@contextmanager
def evaluating(optimizer: torch.optim.Optimizer, on: bool = True) -> Iterator[None]:
    """Within: a schedule-free optimizer's averaged weights are the model's (what is validated, sampled, saved);
    other optimizers are left alone. `on=False` does nothing (every process must switch at the same steps)."""
    switch = on and callable(getattr(optimizer, "eval", None))
    if switch:
        optimizer.eval()
    try:
        yield
    finally:
        if switch:
            optimizer.train()
