"""Sweeps: one queued run per combination of `--grid key=v1,v2` values (× `--seeds N`), named by what differs.

`style` with `--grid lora_rank=8,16 --grid learning_rate=1e-4,3e-4` queues `style-r8-lr1e-4`, `style-r8-lr3e-4`,
… into `<output_dir>/<run name>`. Every run of the sweep shares one `cache_dir` (`<output_dir>/cache`): the
latents and text embeddings are keyed by what changes them (image bytes, crop, flip, VAE; caption, text
encoders, precision), so runs that differ only in LoRA or optimizer settings encode nothing after the first.
"""

from __future__ import annotations

import difflib
import itertools
import re
from pathlib import Path
from typing import Iterable, List, Sequence, Tuple

from ..config import TrainConfig, field_help, load_config
from ..errors import ConfigError

# Short names in run names for the keys people sweep most; any other key is written whole.
SHORT = {"lora_rank": "r", "lora_alpha": "a", "learning_rate": "lr", "text_encoder_lr": "telr", "unet_lr": "ulr",
         "max_train_steps": "steps", "epochs": "ep", "seed": "s", "lora_dropout": "do", "conv_rank": "cr",
         "batch_size": "bs", "resolution": "res", "noise_offset": "no", "min_snr_gamma": "snr",
         "lora_type": "", "optimizer": "", "lr_scheduler": ""}


def parse_grid(items: Iterable[str]) -> List[Tuple[str, List[str]]]:
    """`["lora_rank=8,16", …]` → `[("lora_rank", ["8", "16"]), …]`; a key that is not a config key names the
    nearest one."""
    keys = list(field_help())
    grid: List[Tuple[str, List[str]]] = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        values = [v.strip() for v in raw.split(",") if v.strip()]
        if not sep or not key or not values:
            raise ConfigError(f"--grid expects key=value1,value2 (e.g. --grid lora_rank=8,16), got '{item}'.")
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else " docs/config.md lists the keys."
            raise ConfigError(f"--grid {key}: not a config key.{hint}")
        if key in ("output_dir", "output_name", "cache_dir"):
            raise ConfigError(f"--grid {key}: the sweep names and places its runs itself; sweep another key.")
        if any(k == key for k, _ in grid):
            raise ConfigError(f"--grid {key} is given twice: give its values once, comma-separated.")
        grid.append((key, values))
    if not grid:
        raise ConfigError("A sweep needs at least one --grid key=value1,value2.")
    return grid


def sweep_configs(config: str, sets: Sequence[str], grid: Sequence[Tuple[str, List[str]]],
                  seeds: int = 1) -> List[TrainConfig]:
    """One validated config per combination (and seed), each with its own name, folder and the shared cache."""
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: give 1 or more.")
    base = load_config(config, sets)
    root = Path(base.output_dir)
    cache = base.cache_dir or str(root / "cache")
    out = []
    for values in itertools.product(*(v for _, v in grid)):
        for n in range(seeds):
            pairs = [f"{k}={v}" for (k, _), v in zip(grid, values)]
            seed = [f"seed={base.seed + n}"] if seeds > 1 else []
            try:
                cfg = load_config(config, [*sets, *pairs, *seed])
            except ConfigError as err:
                raise ConfigError(f"--grid {', '.join(pairs)}: {err}") from None
            name = "-".join([base.name, *(_label(k, v) for (k, _), v in zip(grid, values)),
                             *([f"s{base.seed + n}"] if seeds > 1 else [])])
            out.append(cfg.replace(output_name=name, output_dir=str(root / name), cache_dir=cache))
    names = [c.output_name for c in out]
    if len(set(names)) != len(names):
        raise ConfigError("Two combinations of the grid get the same run name: give each value once.")
    return out


def _label(key: str, value: str) -> str:
    """`lora_rank`, `8` → `r8`; `optimizer`, `prodigy` → `prodigy`: short, and safe in a file name."""
    text = f"{SHORT.get(key, key)}{value}"
    return re.sub(r"[^A-Za-z0-9.+_-]+", "_", text)
