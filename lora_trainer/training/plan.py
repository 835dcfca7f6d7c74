"""The memory plan: what a config will need on a device, predicted before anything loads.

Counting, never loading: the UNet, VAE and text encoders are built on the meta device from the
shipped configs (shapes only, no bytes), the LoRA is attached as training attaches it, and one
training forward pass runs on meta tensors while autograd's saved-tensor hooks count what the
backward pass will keep (the activations), per gradient-checkpointing unit. Weights are counted in
their storage dtype, LoRA weights with their gradients and optimizer states. A few measured
constants (bench/memory.py) cover what counting cannot see: the transient buffers of the largest
layer, the VAE encoder's working memory, and, on the CPU, the process's own start-up size.

The peak is the largest of three phases of `train()`: loading (every model in its load dtype),
caching (the models plus one VAE encode) and training (the UNet, LoRA states and activations;
the VAE and text encoders are released or on the CPU by then).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..config import TrainConfig
from ..errors import ConfigError

GB = 1 << 30
# Measured constants (bench/memory.py on the CPU, torch 2.14, SD1.5 at 256 and 512 px; docs/memory.md).
# What a step holds per byte autograd keeps (gradients of activations in backward, temporaries, allocator
# slack), counted over the kept bytes plus STEP_TRANSIENT times the largest kept tensor; copies of the largest
# layer weight alive at once when weights are cast or fetched per layer; what a run adds to the process beyond
# the imports the plan itself already made (TensorBoard, image decoding, thread pools); VAE encode as float32
# copies of its first feature map; a typical process size when it cannot be read. On CUDA the same factors are
# used until a GPU run (bench/gpu_check.sh) measures them.
ACTIVATION_FACTOR = 1.67
STEP_TRANSIENT = 6.0
STORED_COPIES = 2
RUN_OVERHEAD = {"cpu": 295 << 20, "cuda": 0}
VAE_ENCODE_COPIES = {"cpu": 4.5, "cuda": 3.0}
PROCESS_BASE = 700 << 20
MARGIN = {"cpu": 1 * GB, "cuda": GB // 2}  # what `memory_budget_gb: auto` leaves free for everything else


@dataclass
class Plan:
    device: str
    peak_bytes: int
    budget_bytes: Optional[int]
    parts: Dict[str, int]
    changes: List[Dict[str, Any]] = field(default_factory=list)  # [{"set": {key: value}, "peak_bytes": n}]
    settings: Dict[str, Any] = field(default_factory=dict)       # the planned config's memory settings

    @property
    def fits(self) -> bool:
        return self.budget_bytes is None or self.final_peak <= self.budget_bytes

    @property
    def final_peak(self) -> int:
        return self.changes[-1]["peak_bytes"] if self.changes else self.peak_bytes

    def to_dict(self) -> Dict[str, Any]:
        return {"device": self.device, "peak_bytes": self.peak_bytes, "budget_bytes": self.budget_bytes,
                "fits": self.fits, "parts": self.parts, "changes": self.changes, "settings": self.settings,
                "peak_after_changes_bytes": self.final_peak}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary(self) -> str:
        """What the tab, the node and the CLI print: the peak, its parts, the budget and the changes."""
        what = "peak VRAM (allocated)" if self.device.startswith("cuda") else "peak RAM (process)"
        lines = [f"{what} on {self.device}: {_gb(self.peak_bytes)}"]
        lines += [f"  {name}: {_gb(n)}" for name, n in self.parts.items()]
        if self.budget_bytes is not None:
            lines.append(f"budget: {_gb(self.budget_bytes)} — " + ("fits" if self.peak_bytes <= self.budget_bytes
                                                                     else "does not fit as configured"))
        for change in self.changes:
            setting = ", ".join(f"{k}: {v}" for k, v in change["set"].items())
            lines.append(f"  change {setting} → {_gb(change['peak_bytes'])}")
        return "\n".join(lines)


def _gb(n: int) -> str:
    return f"{n / GB:.2f} GB"


# -- the plan -------------------------------------------------------------------------------------

def plan_memory(cfg: TrainConfig, device: Optional[str] = None, budget_gb: Any = None,
                family: Optional[str] = None, weights: Any = None) -> Plan:
    """Predict the training peak of `cfg` on `device` and, given a budget, the changes that make it fit.

    budget_gb: None, 0 or "off" (no budget), a number of GB, or "auto" (free memory now, less a margin).
    family: the model family when `cfg.base_model` cannot tell (a host's weights in memory).
    weights: a host's Flux state dict (all-in-one layout), whose shapes the Flux plan reads.
    Raises ConfigError when no change can meet the budget, naming the smallest reachable peak.
    """
    import torch

    dev = torch.device(device or _default_device(cfg))
    family, variant = architecture(cfg, family, weights)
    budget = resolve_budget(budget_gb, dev)
    base = process_rss() if dev.type != "cuda" else 0  # read once: every variant is compared on the same base
    peak, parts = predict_peak(cfg, dev, family, variant, base)
    plan = Plan(str(dev), peak, budget, parts, settings=_settings(cfg))
    if budget is None or peak <= budget:
        return plan
    changed = cfg
    for step in _change_steps(cfg, dev):
        changed = changed.replace(**step)
        plan.changes.append({"set": step, "peak_bytes": predict_peak(changed, dev, family, variant, base)[0]})
        if plan.changes[-1]["peak_bytes"] <= budget:
            plan.settings = _settings(changed)
            return plan
    raise ConfigError(f"No setting brings this run under the memory budget of {_gb(budget)}: the smallest "
                      f"reachable peak is {_gb(plan.final_peak)} (with {_describe(plan.changes)}). Lower resolution "
                      "or use a device with more memory.")


def apply_plan(cfg: TrainConfig, plan: Plan) -> TrainConfig:
    """`cfg` with every change of `plan` applied, in order."""
    for change in plan.changes:
        cfg = cfg.replace(**change["set"])
    return cfg


def next_change(cfg: TrainConfig, device: str, batch: bool = True) -> Optional[Dict[str, Any]]:
    """The next cheapest change `cfg` has not made yet, or None. batch=False leaves batch_size alone (a running
    step cannot be split differently and stay exact: the out-of-memory back-off)."""
    import torch

    steps = _change_steps(cfg, torch.device(device), batch)
    return steps[0] if steps else None


def _change_steps(cfg: TrainConfig, dev: Any, batch_changes: bool = True) -> List[Dict[str, Any]]:
    """Cheapest in quality first; resolution is never changed."""
    steps: List[Dict[str, Any]] = []
    if not cfg.gradient_checkpointing:
        steps.append({"gradient_checkpointing": True})
    if cfg.base_precision != "fp8":
        steps.append({"base_precision": "fp8"})
    if dev.type == "cuda" and cfg.offload != "blocks" and cfg.lora_type != "dora":  # DoRA reads whole weights
        steps.append({"offload": "blocks"})
    batch, accum = cfg.batch_size, cfg.gradient_accumulation_steps
    while batch_changes and batch > 1:  # the same effective batch in smaller pieces
        batch, accum = (batch + 1) // 2, accum * 2
        steps.append({"batch_size": batch, "gradient_accumulation_steps": accum})
    return steps


def _describe(changes: List[Dict[str, Any]]) -> str:
    return "; ".join(", ".join(f"{k}: {v}" for k, v in c["set"].items()) for c in changes) or "no change"


def _settings(cfg: TrainConfig) -> Dict[str, Any]:
    keys = ("gradient_checkpointing", "base_precision", "offload", "batch_size", "gradient_accumulation_steps")
    return {k: getattr(cfg, k) for k in keys}


def _default_device(cfg: TrainConfig) -> str:
    import torch

    if cfg.device != "auto":
        return cfg.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def budget_is_set(budget: str) -> bool:
    """False for off, 0 and empty (the front ends turn the default 0 into auto on a GPU; off stays off)."""
    return str(budget).strip().lower() not in ("", "0", "0.0", "off")


def budget_left_at_default(budget: str) -> bool:
    """The default 0, not an explicit off or number: the tab and the ComfyUI node make it auto on a GPU."""
    return str(budget).strip() in ("", "0", "0.0")


def resolve_budget(budget_gb: Any, dev: Any) -> Optional[int]:
    """Bytes of the budget: None for no budget; "auto" is the device's free memory now, less a margin."""
    if budget_gb is None or not budget_is_set(budget_gb):
        return None
    if str(budget_gb).strip().lower() == "auto":
        import torch

        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("A budget of auto reads the free VRAM of this machine's GPU, and it has none: give "
                              "the budget in GB to plan for another machine (e.g. --budget-gb 8).")
        return max(0, free_bytes(dev) - MARGIN[dev.type if dev.type in MARGIN else "cpu"])
    try:
        value = float(budget_gb)
    except (TypeError, ValueError):
        raise ConfigError(f"memory_budget_gb must be a number of GB, auto or off, not {budget_gb!r}.") from None
    if value < 0:
        raise ConfigError(f"memory_budget_gb cannot be negative (got {value}).")
    return int(value * GB)


def free_bytes(dev: Any) -> int:
    """Free memory on `dev` now: the GPU's free VRAM, or the system's available RAM."""
    import torch

    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def process_rss() -> int:
    """This process's resident size now (Linux), else a measured typical start-up size."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return PROCESS_BASE


# -- architecture ---------------------------------------------------------------------------------

def architecture(cfg: TrainConfig, family: Optional[str] = None, weights: Any = None) -> Tuple[str, str]:
    """(family, shipped variant) from the checkpoint's header or folder configs, reading no weights; for Flux,
    the variant is the shapes of its files (or of a host's Flux `weights`)."""
    from ..model.checkpoint_file import CheckpointFile
    from ..model.detect import UNET_PREFIX, detect_family, normalize_keys
    from ..model.folder import folder_family, is_diffusers_folder
    from ..model.shipped import load_configs, variants

    from ..model.flux import is_flux

    if weights is not None and is_flux(weights):
        return "flux", flux_architecture(cfg, weights)
    family = family or (cfg.model_family if cfg.model_family != "auto" else None)
    path = Path(cfg.base_model).expanduser() if cfg.base_model else None
    if path is not None and path.is_dir() and is_diffusers_folder(path):
        return family or folder_family(path), "base"
    if path is not None and path.is_file() and path.suffix.lower() == ".safetensors":
        if is_flux(CheckpointFile(path)):
            return "flux", flux_architecture(cfg, path)
        header = normalize_keys(CheckpointFile(path))
        family = family or detect_family(list(header))
        key = UNET_PREFIX + "input_blocks.0.0.weight"
        if key in header:
            for variant in variants(family):
                unet = load_configs(family, variant)["unet"]
                if header.shape(key) == (unet["block_out_channels"][0], unet["in_channels"], 3, 3):
                    return family, variant
        return family, "base"
    if path is not None and family is None:
        from ..model.loader import base_model_path

        base_model_path(cfg.base_model)  # a missing file or folder is named, not the family asked for
    if family is None:
        raise ConfigError("The plan needs the model family: set base_model to a .safetensors file or diffusers "
                          "folder, or model_family to sd1, sd2 or sdxl.")
    return family, "base"


def flux_architecture(cfg: TrainConfig, source: Any) -> str:
    """The shapes of a Flux run's four parts (transformer, clip_l, t5xxl, vae), read from their headers (or a
    host's state dict), as JSON: the `variant` the Flux plan is counted with (reduced files as they are)."""
    from ..model.flux import flux_configs, flux_files

    files = flux_files(source, {"clip_l": cfg.clip_l, "t5xxl": cfg.t5xxl, "vae": cfg.vae})
    return json.dumps(flux_configs(files), sort_keys=True)


# -- prediction -----------------------------------------------------------------------------------

def predict_peak(cfg: TrainConfig, dev: Any, family: str, variant: str,
                 process_base: int = 0) -> Tuple[int, Dict[str, int]]:
    """(peak bytes, its parts) of training `cfg` on `dev` with the shipped `family`/`variant` architecture;
    on the CPU `process_base` (the process's own size before the run) is added."""
    import torch

    from ..model.precision import load_dtype, quantized_dtype, storage_dtype
    from .setup import pick_precision

    _, compute = pick_precision(cfg.replace(device=str(dev)), dev) if dev.type != "cuda" else _cuda_precision(cfg)
    storage = storage_dtype(cfg.base_precision, compute)
    counts = _counts(family, variant, tuple(cfg.target_modules), cfg.lora_rank, cfg.conv_rank,
                     cfg.train_text_encoder)
    size = torch.finfo(compute).bits // 8
    store = torch.finfo(storage).bits // 8
    unet_w = counts["unet_matrix"] * store + counts["unet_other"] * size
    te_w = counts["te_matrix"] * store + counts["te_other"] * size
    vae_w = counts["vae"] * 4
    offloaded = dev.type == "cuda" and cfg.offload == "blocks"
    if offloaded:  # matrices stay in CPU RAM and visit the GPU one layer at a time
        unet_w = counts["unet_other"] * size  # (the layer weights in flight are counted with the activations)
    from .optimizers import OPTIMIZERS

    lora = int(counts["lora"] * (4 + 4 + OPTIMIZERS[cfg.optimizer].state_bytes))  # fp32 weights, gradients, states
    saved, largest = _activations(family, variant, tuple(cfg.target_modules), cfg.lora_rank, cfg.conv_rank,
                                  cfg.resolution, cfg.batch_size, str(compute), cfg.gradient_checkpointing,
                                  cfg.lora_dropout > 0)
    activations = int(ACTIVATION_FACTOR * (saved + STEP_TRANSIENT * largest))
    if storage != compute or offloaded:  # a layer's weight cast (or fetched) in forward and again in backward
        activations += STORED_COPIES * counts["largest_matrix"] * size
    pixels = cfg.resolution * cfg.resolution
    vae_encode = int(VAE_ENCODE_COPIES["cuda" if dev.type == "cuda" else "cpu"] * counts["vae_channels"] * pixels * 4)
    read = torch.finfo(load_dtype(storage, compute)).bits // 8
    unet_read = (counts["unet_matrix"] + counts["unet_other"]) * read
    te_read = (counts["te_matrix"] + counts["te_other"]) * read
    if quantized_dtype(storage) is not None:  # layer weights are quantized as they are read
        load_bytes = (counts["unet_matrix"] + counts["te_matrix"]) * store + \
            (counts["unet_other"] + counts["te_other"]) * read + vae_w
    else:
        load_bytes = unet_read + te_read + vae_w
    if dev.type == "cuda":
        phases = {"loading": 0, "caching": unet_w + te_w + vae_w + vae_encode,
                  "training": unet_w + lora + activations}
    else:
        keeps_encoders = bool(cfg.sample_prompts)  # else released once their caches are filled
        phases = {"loading": load_bytes, "caching": unet_w + te_w + vae_w + vae_encode,
                  "training": unet_w + lora + activations + (te_w + vae_w if keeps_encoders else 0)}
    phase = max(phases, key=phases.get)
    parts = {"base weights (UNet)": unet_w, "text encoders + VAE": te_w + vae_w, "LoRA + optimizer": lora,
             "activations": activations, f"largest phase: {phase}": phases[phase]}
    peak = phases[phase]
    if dev.type != "cuda":
        parts["process itself"] = process_base + RUN_OVERHEAD["cpu"]
        peak += process_base + RUN_OVERHEAD["cpu"]
    return int(peak), {k: int(v) for k, v in parts.items()}


def _cuda_precision(cfg: TrainConfig):
    """pick_precision for a CUDA device that may not be this machine's (planning for another GPU)."""
    import torch

    mode = cfg.mixed_precision
    if mode == "auto":
        mode = "bf16" if (not torch.cuda.is_available() or torch.cuda.is_bf16_supported()) else "fp16"
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mode]
    return (None if dtype == torch.float32 else dtype), dtype


@lru_cache(maxsize=16)
def _counts(family: str, variant: str, targets: tuple, rank: int, conv_rank: int, train_te: bool) -> Dict[str, int]:
    """Parameter counts by kind: matrices (Linear/Conv weights: what base_precision stores), the rest, LoRA."""
    from torch import nn

    from ..adapters.lora import TEXT_TARGETS, base_targets, resolve_targets, trained_text_encoders
    from .setup import stored_text_encoders

    unet, vae, encoders = _meta_models(family, variant)

    def split(model):
        matrix = sum(m.weight.numel() for m in model.modules() if type(m) in (nn.Linear, nn.Conv2d))
        return matrix, sum(p.numel() for p in model.parameters()) - matrix

    unet_matrix, unet_other = split(unet)
    stored = stored_text_encoders(family, encoders)
    te = [split(e) if any(e is s for s in stored) else (0, sum(p.numel() for p in e.parameters())) for e in encoders]
    modules = dict(unet.named_modules())
    lora = sum(_lora_size(modules[n], rank, conv_rank) for n in base_targets(unet, family, list(targets)))
    if train_te:
        for encoder in trained_text_encoders(family, encoders):
            names = resolve_targets(encoder, list(targets), TEXT_TARGETS, strict=False) or \
                resolve_targets(encoder, ["attn"], TEXT_TARGETS)
            named = dict(encoder.named_modules())
            lora += sum(_lora_size(named[n], rank, 0) for n in names)
    largest = max(m.weight.numel() for m in unet.modules() if type(m) in (nn.Linear, nn.Conv2d))
    return {"unet_matrix": unet_matrix, "unet_other": unet_other, "te_matrix": sum(m for m, _ in te),
            "te_other": sum(o for _, o in te), "vae": sum(p.numel() for p in vae.parameters()), "lora": lora,
            "vae_channels": vae.config.block_out_channels[0],
            "largest_matrix": largest}


def _lora_size(module: Any, rank: int, conv_rank: int) -> int:
    from torch import nn

    if isinstance(module, nn.Conv2d):
        r = conv_rank or rank
        k = module.kernel_size[0] * module.kernel_size[1]
        return r * module.in_channels * k + module.out_channels * r
    return rank * (module.in_features + module.out_features)


@lru_cache(maxsize=4)
def _meta_models(family: str, variant: str):
    """UNet (Flux: its transformer), VAE and text encoders of the architecture on the meta device (no memory)."""
    import torch

    from ..model import factory
    from .activations import meta_unet
    from ..model.shipped import load_configs, text_encoder_parts

    unet = meta_unet(family, variant)
    if family == "flux":
        from diffusers import AutoencoderKL
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        configs = json.loads(variant)
        with torch.device("meta"):
            vae = AutoencoderKL.from_config(configs["vae"])
            encoders = [CLIPTextModel(CLIPTextConfig.from_dict(configs["clip"])),
                        T5EncoderModel(T5Config.from_dict(configs["t5"]))]
        return unet, vae, encoders
    configs = load_configs(family, variant)
    with torch.device("meta"):
        vae = factory.build_vae(configs["vae"])
        encoders = [factory.build_text_encoder(configs[p]) for p in text_encoder_parts(family)]
    return unet, vae, encoders


@lru_cache(maxsize=64)
def _activations(family: str, variant: str, targets: tuple, rank: int, conv_rank: int, resolution: int,
                 batch: int, dtype_name: str, checkpointing: bool, dropout: bool) -> Tuple[int, int]:
    """(bytes autograd keeps for the backward pass, bytes of the largest kept tensor) of one UNet training step,
    counted by running it on meta tensors with LoRA attached as `train()` attaches it."""
    from .activations import count_saved

    return count_saved(family, variant, list(targets), rank, conv_rank, resolution, batch, dtype_name,
                       checkpointing, dropout)
