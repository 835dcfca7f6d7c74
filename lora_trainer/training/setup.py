"""Everything a training run holds before its first step: data, model, LoRA, optimizer, caches.

`prepare_run` turns a config into a `Run`; `train.py` only loops over it. Nothing here is
global, so a multi-GPU wrapper can build one Run per process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from ..adapters import lora as lora_mod
from ..callbacks import Callbacks
from ..config import TrainConfig
from ..data.dataset import batches_per_epoch, missing_class_images, optimizer_steps, scan_images, scan_regularization
from .class_images import make_class_images
from .distributed import SINGLE, Processes, replicate
from .optimizers import make_lr_scheduler, make_optimizer
from ..errors import ConfigError, TrainingError
from ..adapters.export import load_lora_file
from ..data.latents import LatentCache, TextEmbeddingCache, vae_fingerprint
from ..model.precision import load_dtype, place_base_weights, quantized_dtype, storage_dtype, store_base_weights
from .state import LoadedState, Position, dataset_hash, load_state
from .validation import validation_records


@dataclass
class Run:
    cfg: TrainConfig
    components: Any
    records: List[Any]
    device: torch.device
    autocast_dtype: Optional[torch.dtype]
    unet_params: List[torch.nn.Parameter]
    te_params: List[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    scaler: Optional[Any]
    latent_cache: Optional[LatentCache]
    text_cache: Optional[TextEmbeddingCache]
    data_hash: str
    total_steps: int
    batches_per_epoch: int
    output_dir: Path
    position: Position = field(default_factory=Position)
    started_at: float = field(default_factory=time.time)
    info: Dict[str, Any] = field(default_factory=dict)
    owns_components: bool = False  # loaded by the run (not passed in): it may free them as it goes
    mask_cache: Dict[Any, torch.Tensor] = field(default_factory=dict)  # masked_loss: (image, bucket, crop) → mask
    val_records: List[Any] = field(default_factory=list)  # validation images: never in `records`
    validation_state: Dict[str, Any] = field(default_factory=dict)  # from the resumed state: the best val_loss
    processes: Processes = SINGLE  # this process's place among the torchrun processes sharing each batch
    replica: Optional[torch.nn.Module] = None  # the DDP wrapper the forward runs through (several processes)

    @property
    def params(self) -> List[torch.nn.Parameter]:
        return self.unet_params + self.te_params

    @property
    def trains_text_encoder(self) -> bool:
        return bool(self.te_params)

    @property
    def global_batch(self) -> int:
        """Images per micro-batch over all processes (the optimizer step takes gradient_accumulation_steps)."""
        return self.cfg.batch_size * self.processes.world


def pick_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {cfg.device} was asked for but no CUDA GPU is visible. Use device: auto.")
    return device


def pick_precision(cfg: TrainConfig, device: torch.device) -> Tuple[Optional[torch.dtype], torch.dtype]:
    """(autocast dtype or None, the dtype layers compute in). LoRA weights stay fp32."""
    mode = cfg.mixed_precision
    if mode == "auto":
        if device.type != "cuda":
            return None, torch.float32  # CPU: fp32 whatever the checkpoint's dtype
        mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if mode == "no":
        return None, torch.float32
    if mode == "fp16" and device.type != "cuda":
        raise ConfigError("mixed_precision: fp16 needs a CUDA GPU; use auto or no on CPU.")
    dtype = torch.float16 if mode == "fp16" else torch.bfloat16
    return dtype, dtype


@dataclass
class Inputs:
    """What is checked before the host gives up its GPU: the images and the resume state."""
    records: List[Any]
    data_hash: str
    loaded: Optional[LoadedState]
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (image, why) the scan left out
    validation: List[Any] = field(default_factory=list)  # held out (validation_split) or validation_dir's images
    class_images_missing: int = 0  # reg_generate's images still to make (then reg_data_dir is read after loading)
    scan: str = ""  # the scan's one-line summary (the doctor's)


def check_inputs(cfg: TrainConfig, callbacks: Callbacks, resume: Optional[str] = None,
                 processes: Processes = SINGLE) -> Inputs:
    records, report = scan_images(cfg)
    callbacks.on_status(report.summary())
    records, held_out = validation_records(cfg, records, callbacks)  # held-out images never reach a batch
    missing = missing_class_images(cfg)
    if cfg.reg_data_dir and not missing:
        records = records + regularization_records(cfg, callbacks)
    data_hash = dataset_hash(records)
    loaded = load_state(Path(resume), cfg, data_hash, processes.world) if resume else None
    return Inputs(records, data_hash, loaded, list(report.skipped), held_out, missing, report.summary())


def regularization_records(cfg: TrainConfig, callbacks: Callbacks) -> List[Any]:
    reg, report = scan_regularization(cfg)
    callbacks.on_status(f"class images in {Path(cfg.reg_data_dir).name}: {report.summary()}")
    return reg


def prepare_run(cfg: TrainConfig, callbacks: Callbacks, base_weights: Optional[Mapping[str, torch.Tensor]] = None,
                base_name: Optional[str] = None, resume: Optional[str] = None, components: Any = None,
                inputs: Optional[Inputs] = None, processes: Processes = SINGLE) -> Run:
    from ..model import load_components
    from ..model.flux import is_flux, is_flux_file

    if (components.family == "flux" if components is not None else is_flux(base_weights) if base_weights is not None
            else cfg.model_family == "flux" or is_flux_file(cfg.base_model or "")):
        check_flux_settings(cfg)  # before a 12B model is read
    inputs = inputs or check_inputs(cfg, callbacks, resume, processes)
    records, data_hash, loaded = inputs.records, inputs.data_hash, inputs.loaded
    torch.manual_seed(cfg.seed)

    device = pick_device(cfg)
    autocast_dtype, compute_dtype = pick_precision(cfg, device)
    storage = storage_dtype(cfg.base_precision, compute_dtype)
    owns_components = components is None
    if owns_components:
        callbacks.on_status("loading the base model")
        source = base_weights if base_weights is not None else cfg.base_model
        if source is None or source == "":
            raise ConfigError("base_model is empty: give the path of a .safetensors checkpoint or a diffusers folder.")
        # Read straight into the dtype it trains in (fp32 VAE: it only encodes, and fp16 VAEs overflow).
        components = load_components(source, family=cfg.model_family, prediction_type=cfg.prediction_type,
                                     allow_ckpt=cfg.allow_ckpt, name=base_name,
                                     dtype=load_dtype(storage, compute_dtype), vae_dtype=torch.float32,
                                     matrix_dtype=quantized_dtype(storage),
                                     flux_parts={"clip_l": cfg.clip_l, "t5xxl": cfg.t5xxl, "vae": cfg.vae,
                                                 "t5_tokenizer": cfg.t5_tokenizer})

    unet_params, te_params = _attach_lora(components, cfg, loaded)
    if cfg.gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
        for te in components.text_encoders if te_params else []:
            te.gradient_checkpointing_enable()
    offload = cfg.offload == "blocks" and device.type == "cuda"
    if cfg.offload == "blocks" and not offload:
        callbacks.on_status("offload: blocks has no effect on the CPU (the weights are in RAM already)")
    # Cast on the CPU before moving (no full-precision peak on the GPU); offloaded weights never go there whole.
    stored = stored_text_encoders(components.family, components.text_encoders)
    store_base_weights([components.unet, *stored], storage, compute_dtype, offload=offload)
    place_base_weights(components.unet, device, offload)
    for module in components.text_encoders:
        module.to(device)
    components.vae.to(device)
    if next(components.vae.parameters()).dtype != torch.float32:
        components.vae.to(dtype=torch.float32)  # fp16 VAEs overflow (SDXL); it only encodes
    if inputs.class_images_missing:  # reg_generate: the base model makes them, on the device the run trains on
        if processes.main:
            make_class_images(cfg, components, device, callbacks)
        processes.wait_for_all()
        records = records + regularization_records(cfg, callbacks)
        data_hash = dataset_hash(records)

    epoch_length = batches_per_epoch(records, cfg, processes.world)  # counted, not built: no epoch just for this
    _, total_steps = optimizer_steps(epoch_length, cfg)

    optimizer = make_optimizer(cfg, unet_params, te_params, device, up_weights(components))
    lr_scheduler = make_lr_scheduler(cfg, optimizer, total_steps)
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None

    output_dir = Path(cfg.output_dir)
    if processes.main:  # the others write only their share of the latent cache
        output_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else output_dir / "cache"
    latent_cache = None
    if cfg.cache_latents:
        latent_cache = LatentCache(cache_dir / "latents", vae_fingerprint(components.vae))
    text_cache = None
    if cfg.cache_text_embeddings and not te_params and not cfg.shuffle_caption:
        from ..model import encode_text

        text_id = f"{components.family}|{device.type}|{autocast_dtype}|{vae_fingerprint(*components.text_encoders)}"
        text_cache = TextEmbeddingCache(lambda captions: encode_text(components, captions), cache_dir / "text",
                                        text_id, device)

    run = Run(cfg, components, records, device, autocast_dtype, unet_params, te_params, optimizer, lr_scheduler,
              scaler, latent_cache, text_cache, data_hash, total_steps, epoch_length, output_dir,
              owns_components=owns_components, val_records=list(inputs.validation), processes=processes)
    run.info.update(_run_info(cfg, records, epoch_length, total_steps, autocast_dtype, processes.world))
    run.info["base_precision"] = str(storage).removeprefix("torch.")  # what was really used (auto resolved)
    if loaded is not None:
        _restore(run, loaded)
        callbacks.on_status(f"resumed from {loaded.folder} at step {run.position.step}")
    if processes.many:  # after the restore: every process starts from the same LoRA weights
        run.replica = replicate([components.unet, *(components.text_encoders if te_params else [])], device)
    return run


def up_weights(components: Any) -> frozenset:
    """The ids of every LoRA up matrix of the run (LoRA+ gives them their own learning rate)."""
    return frozenset(id(layer.lora_B[lora_mod.ADAPTER].weight) for model in components.models()
                     for layer in lora_mod.lora_layers(model).values())


def stored_text_encoders(family: str, encoders: List[Any]) -> List[Any]:
    """The text encoders base_precision stores: Flux's T5 casts its activations to its layers' dtype (transformers'
    T5 does), so it stays in compute dtype; CLIP-L and SD's encoders are stored as the UNet is."""
    return list(encoders[:1] if family == "flux" else encoders)


def check_flux_settings(cfg: TrainConfig) -> None:
    """What a Flux run cannot do yet, each said in one line before anything is trained."""
    if cfg.lora_type != "lora":
        raise ConfigError(f"lora_type {cfg.lora_type}: Flux LoRAs are trained as lora only for now.")
    if cfg.bucket_reso_steps % 16 or cfg.resolution % 16:
        raise ConfigError("Flux packs 2×2 latents: resolution and bucket_reso_steps must be multiples of 16.")


def _attach_lora(components: Any, cfg: TrainConfig, loaded: Optional[LoadedState]):
    if loaded is not None:
        return lora_mod.load_lora_into(components, loaded.lora, cfg.lora_dropout, trainable=True)
    if cfg.init_lora:
        return load_lora_file(components, cfg.init_lora, cfg.lora_dropout, trainable=True)
    return lora_mod.add_lora_to_components(components, cfg)


def _restore(run: Run, loaded: LoadedState) -> None:
    from .state import restore_rng

    trainer = loaded.trainer
    run.optimizer.load_state_dict(trainer["optimizer"])
    run.lr_scheduler.load_state_dict(trainer["lr_scheduler"])
    if run.scaler is not None and trainer.get("scaler"):
        run.scaler.load_state_dict(trainer["scaler"])
    restore_rng(trainer["rng"])
    run.position = loaded.position
    run.validation_state = dict(loaded.validation or {})
    run.started_at = trainer.get("started_at", run.started_at)
    if run.position.step > run.total_steps:
        raise TrainingError(f"The state is at step {run.position.step}, past this run's {run.total_steps} steps: "
                            "raise epochs or max_train_steps to train further.")


def _run_info(cfg: TrainConfig, records, batches_per_epoch: int, total_steps: int, autocast_dtype,
              processes: int) -> Dict[str, Any]:
    """What the LoRA's metadata records about the data and the run."""
    from collections import Counter

    folder = Path(cfg.train_data_dir).name
    reg = [r for r in records if r.is_reg]
    records = [r for r in records if not r.is_reg]
    tags: Counter = Counter()
    for r in records:
        tags.update(t.strip() for t in r.caption.split(",") if t.strip())
    return {
        "num_images": len(records) * cfg.repeats,
        "num_reg_images": len(reg),
        "reg_dataset_dirs": {Path(cfg.reg_data_dir).name: {"n_repeats": 1, "img_count": len(reg)}} if reg else {},
        "batches_per_epoch": batches_per_epoch,
        "max_train_steps": total_steps,
        "processes": processes,
        "dataset_dirs": {folder: {"n_repeats": cfg.repeats, "img_count": len(records)}},
        "tag_frequency": {folder: dict(tags)},
        "mixed_precision": {None: "no", torch.float16: "fp16", torch.bfloat16: "bf16"}[autocast_dtype],
    }
