"""The training config: one flat dataclass whose field names are the YAML keys.

The YAML config (train_data_dir, lora_rank, ...) is flat, and so are kohya's options, so the
config is flat too: one key, one field, one help text. Fields carry a `group` so the A1111 form
and the ComfyUI node can lay them out, and `choices` where only some values make sense.
Everything is validated at load: an unknown key names the nearest valid one, a wrong type names
the field and what it expects.
"""

from __future__ import annotations

import dataclasses
import functools
import difflib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional

from .errors import ConfigError


def _f(default: Any, help: str, group: str, choices: Optional[Iterable[Any]] = None, **kw: Any) -> Any:
    meta = {"help": help, "group": group, "choices": tuple(choices) if choices else None}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta, **kw)
    if isinstance(default, dict):
        return field(default_factory=lambda d=default: dict(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


PRECISIONS = ("auto", "no", "fp16", "bf16")
BASE_PRECISIONS = ("auto", "fp32", "fp16", "bf16", "fp8")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor", "came", "lion", "adamw_schedulefree")
LORA_TYPES = ("lora", "dora", "loha", "lokr")
MAX_VALIDATION_IMAGES = 20  # validation passes stay under ~10 % of the training time (bench/validation_cost.py)
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


@dataclass
class TrainConfig:
    # --- data -------------------------------------------------------------------------------
    train_data_dir: str = _f("", "Folder of training images (flat; no repeat count in the name).", "data")
    metadata_path: str = _f(
        "",
        "Captions file: metadata.csv (file,caption rows) or metadata.jsonl (file_name,text). "
        "Empty: use metadata.csv / metadata.jsonl in train_data_dir, then .txt sidecars.",
        "data",
    )
    caption_extension: str = _f(".txt", "Extension of caption sidecar files next to each image.", "data")
    trigger_word: str = _f("", "Word put first in every caption (added where a caption lacks it).", "data")
    repeats: int = _f(1, "How many times each image is seen per epoch.", "data")
    resolution: int = _f(512, "Training resolution (the side of a square of the same area).", "data")
    enable_bucket: bool = _f(True, "Group images by aspect ratio instead of centre-cropping to a square.", "data")
    min_bucket_reso: int = _f(256, "Smallest bucket side in pixels.", "data")
    max_bucket_reso: int = _f(1024, "Largest bucket side in pixels.", "data")
    bucket_reso_steps: int = _f(64, "Bucket sides are multiples of this many pixels.", "data")
    bucket_no_upscale: bool = _f(False, "Never enlarge a small image to fill its bucket.", "data")
    flip_aug: bool = _f(False, "Randomly mirror images left-right (not for asymmetric subjects or text).", "data")
    random_crop: bool = _f(False, "Crop at a random place instead of the centre when an image overflows its bucket.", "data")
    shuffle_caption: bool = _f(False, "Shuffle the comma-separated parts of each caption every time it is used.", "data")
    keep_tokens: int = _f(0, "With shuffle_caption: keep this many leading parts (e.g. the trigger word) in place.", "data")
    caption_dropout_rate: float = _f(0.0, "Fraction of steps trained with an empty caption.", "data")
    cache_latents: bool = _f(True, "Encode each image with the VAE once and cache the result on disk.", "data")
    cache_text_embeddings: bool = _f(True, "Encode captions once when the text encoders are frozen.", "data")
    cache_dir: str = _f(
        "", "Folder of the latent and text-embedding caches; empty: output_dir/cache. Runs that share it (a sweep does) "
        "encode each image and caption once: entries are keyed by the image bytes or caption, the crop and the model.",
        "data")
    validation_split: float = _f(
        0.0, "Share of the images (0-0.5) held out to measure a validation loss, chosen by the seed and never "
        f"trained on: at least 1 image, at most {MAX_VALIDATION_IMAGES}. 0 turns it off.", "data")
    validation_dir: str = _f(
        "", "Folder of validation images with their captions (read like train_data_dir's), never trained on; "
        f"the seed picks {MAX_VALIDATION_IMAGES} when it holds more. Instead of validation_split.", "data")
    reg_data_dir: str = _f(
        "", "Folder of regularization (class) images with their captions (.txt sidecars; class_prompt where one has "
        "none): each epoch trains as many of them as training images (repeats included), as kohya's scripts do.",
        "data")
    prior_loss_weight: float = _f(1.0, "Weight of the regularization images' loss against the training images'.",
                                  "data")
    reg_generate: int = _f(
        0, "Make this many class images with the base model and class_prompt in reg_data_dir before training "
        "(only those missing: a folder that holds them already is used as it is); 0 off.", "data")
    class_prompt: str = _f("", "The class the subject belongs to (e.g. 'a photo of a woman'): the caption of the "
                           "regularization images that have none, and the prompt reg_generate uses.", "data")
    masked_loss: bool = _f(
        False, "Train only where each image's mask is white: <name>_mask.png beside the image, <name>.png in "
        "mask_dir, or the image's alpha channel. The loss is weighted by the mask at latent size.", "data")
    mask_dir: str = _f("", "With masked_loss: a folder of masks named as the images (a .png each).", "data")
    # --- model ------------------------------------------------------------------------------
    base_model: str = _f(
        "", "Base checkpoint: a single .safetensors file (SD1.x, SD2.x, SDXL), a diffusers folder, or a Flux.1 "
        "transformer (flux1-dev.safetensors, in the original layout; with clip_l, t5xxl and vae).", "model"
    )
    model_family: str = _f("auto", "Model family; auto detects it from the checkpoint's keys.", "model",
                           ("auto", "sd1", "sd2", "sdxl", "flux"))
    clip_l: str = _f("", "Flux: the CLIP-L text encoder file (clip_l.safetensors).", "model")
    t5xxl: str = _f("", "Flux: the T5-XXL text encoder file (t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn).", "model")
    vae: str = _f("", "Flux: the autoencoder file (ae.safetensors).", "model")
    t5_tokenizer: str = _f(
        "", "Flux: a folder with T5's tokenizer (tokenizer.json or spiece.model), e.g. ComfyUI's "
        "comfy/text_encoders/t5_tokenizer.", "model")
    guidance_scale: float = _f(1.0, "Flux dev: the guidance embedding's value while training.", "model")
    timestep_sampling: str = _f(
        "sigmoid", "Flux: how each image's noise level t is drawn: sigmoid (of a normal draw), shift (sigmoid, then "
        "moved towards noise by discrete_flow_shift), flux_shift (sigmoid, shifted by the image's size as Flux.1-dev "
        "samples: e^0.5 at 256 px, e^1.15 at 1024 px) or uniform.", "model",
        ("sigmoid", "shift", "flux_shift", "uniform"))
    discrete_flow_shift: float = _f(3.0, "Flux with timestep_sampling shift: the shift (1 changes nothing).", "model")
    prediction_type: str = _f("auto", "What the UNet predicts; auto: v for SD2 768-v checkpoints, else epsilon.",
                              "model", ("auto", "epsilon", "v_prediction"))
    allow_ckpt: bool = _f(False, "Allow loading a .ckpt pickle (loaded with weights_only=True).", "model")
    # --- lora -------------------------------------------------------------------------------
    lora_rank: int = _f(16, "LoRA rank (network dim): the size of each low-rank update.", "lora")
    lora_alpha: float = _f(32.0, "LoRA alpha; the update is scaled by alpha / rank (2 x rank is a common choice).", "lora")
    target_modules: List[str] = _f(
        ["q_proj", "k_proj", "v_proj", "out_proj"],
        "UNet layers to train: q_proj, k_proj, v_proj, out_proj (attention, mapped to to_q/to_k/to_v/to_out.0), "
        "proj (proj_in/proj_out), ff (feed-forward), conv (ResNet convs, LoCon); diffusers names also work.",
        "lora",
    )
    lora_dropout: float = _f(0.0, "Dropout on the LoRA path while training (0.1 is a common choice).", "lora")
    lora_type: str = _f(
        "lora", "lora; dora: DoRA (weight-decomposed LoRA) also learns the size of each input channel of every "
        "trained layer; loha (Hadamard product of two low-rank updates) or lokr (Kronecker product; with lokr_factor) "
        "in the LyCORIS layout. AUTOMATIC1111 1.10, ComfyUI and Forge apply all four exactly: docs/lycoris.md.",
        "lora", LORA_TYPES)
    lokr_factor: int = _f(
        -1, "LoKr: the size of the small Kronecker factor (8 is a common choice); -1 makes both factors as square as "
        "each layer allows.", "lora")
    decompose_both: bool = _f(False, "LoKr: also factor the small matrix into two of rank lora_rank.", "lora")
    conv_rank: int = _f(0, "Rank for conv layers when target_modules has conv; 0 uses lora_rank.", "lora")
    conv_alpha: float = _f(0.0, "Alpha for conv layers; 0 uses lora_alpha.", "lora")
    train_text_encoder: bool = _f(False, "Also train LoRA on the text encoder(s) (SDXL: both).", "lora")
    text_encoder_lr: float = _f(0.0, "Learning rate for the text encoder LoRA; 0 uses learning_rate.", "lora")
    init_lora: str = _f("", "Start from an existing LoRA file (ours, kohya or peft/diffusers naming).", "lora")
    # --- training ---------------------------------------------------------------------------
    batch_size: int = _f(1, "Images per step, in each process with --gpus.", "training")
    epochs: int = _f(10, "Passes over the dataset (x repeats).", "training")
    max_train_steps: int = _f(0, "Stop after this many optimizer steps; 0 uses epochs.", "training")
    learning_rate: float = _f(1e-4, "Learning rate for the UNet LoRA.", "training")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step (a larger batch on less VRAM).", "training")
    mixed_precision: str = _f("auto", "auto: bf16 on GPUs that have it, else fp16 on GPU, fp32 on CPU.", "training",
                              PRECISIONS)
    base_precision: str = _f(
        "auto", "Precision the frozen base weights are kept in: auto (the GPU's half precision, fp32 on CPU), fp32, "
        "fp16, bf16, or fp8 (float8 storage, each layer computed in the training precision: about half the "
        "memory of fp16 for the weights). LoRA weights always train in fp32.", "training", BASE_PRECISIONS)
    gradient_checkpointing: bool = _f(False, "Recompute activations to save VRAM (slower).", "training")
    offload: str = _f("none", "blocks: the UNet's layer weights stay in CPU RAM and visit the GPU one layer at a "
                      "time in forward and backward (for SDXL on 6-8 GB cards; slower). No effect on CPU.",
                      "training", ("none", "blocks"))
    memory_budget_gb: str = _f(
        "0", "Memory the run may use: 0 (off), a number of GB, or auto (free VRAM or RAM now, less a margin). When "
        "set, the settings that make the plan fit are applied before loading (see `python -m lora_trainer plan`).",
        "training")
    optimizer: str = _f(
        "adamw", "adamw (fused on CUDA); adamw8bit (bitsandbytes); prodigy (prodigyopt: set learning_rate 1.0, "
        "lr_scheduler constant or cosine); adafactor (transformers: its own relative-step schedule, lr_scheduler "
        "constant; optimizer_args relative_step=False for a fixed learning_rate); came (came-pytorch); lion "
        "(lion-pytorch: about a tenth of AdamW's learning_rate); adamw_schedulefree (schedulefree: lr_scheduler "
        "constant, lr_warmup_steps its warm-up). The optional packages are not installed for you: docs/optimizers.md.",
        "training", OPTIMIZERS)
    optimizer_args: Dict[str, Any] = _f(
        {}, "Extra arguments of the optimizer, checked against its signature: a mapping in YAML "
        "(optimizer_args: {d_coef: 0.8}) or key=value pairs (d_coef=0.8, decouple=true).", "training")
    loraplus_lr_ratio: float = _f(
        0.0, "LoRA+: the up matrices learn at this multiple of the learning rate (16 is the paper's); 0 off.",
        "training")
    weight_decay: float = _f(0.01, "Weight decay (decoupled, as AdamW's).", "training")
    max_grad_norm: float = _f(1.0, "Clip gradients to this norm; 0 disables clipping.", "training")
    lr_scheduler: str = _f("constant", "Learning-rate schedule.", "training", SCHEDULERS)
    lr_warmup_steps: int = _f(0, "Steps of linear warm-up at the start.", "training")
    min_snr_gamma: float = _f(0.0, "Min-SNR loss weighting (5 is common); 0 disables it.", "training")
    noise_offset: float = _f(0.0, "Noise offset (0.05-0.1 helps very dark or bright images); 0 disables it.",
                             "training")
    seed: int = _f(42, "Random seed; the same seed on CPU gives the same LoRA.", "training")
    device: str = _f("auto", "auto, cpu, cuda or cuda:N.", "training")
    # --- output -----------------------------------------------------------------------------
    output_dir: str = _f("./output/lora", "Folder for the LoRA, checkpoints, samples and logs.", "output")
    output_name: str = _f("", "File name of the LoRA (no extension); empty uses the output_dir's name.", "output")
    save_steps: int = _f(0, "Save a checkpoint every N steps; 0 saves only at the end.", "output")
    save_last_n: int = _f(3, "Keep only the last N step checkpoints (0 keeps all).", "output")
    save_precision: str = _f("fp16", "Precision of the saved LoRA weights.", "output", ("fp16", "bf16", "fp32"))
    sample_prompts: List[str] = _f([], "Prompts rendered as a strength grid while training.", "output")
    sample_every_steps: int = _f(0, "Render the sample grid every N steps; 0 only at the end (if prompts).", "output")
    sample_strengths: List[float] = _f([0.0, 0.5, 0.7, 1.0], "LoRA strengths in the sample grid.", "output")
    sample_steps: int = _f(20, "Sampling steps per sample image.", "output")
    validation_timesteps: int = _f(
        4, "Noise levels each validation image is scored at (evenly spaced, the same noise every time), at every "
        "save_steps checkpoint and at the end.", "output")
    save_best: bool = _f(False, "With validation: also keep the checkpoint with the lowest validation loss so far, "
                         "as output_name-best.safetensors (a finished file is never overwritten).", "output")

    def __post_init__(self) -> None:
        self._validate()

    # -- validation --------------------------------------------------------------------------
    def _validate(self) -> None:
        for f in dataclasses.fields(self):
            value = _coerce(f.name, getattr(self, f.name), _field_types()[f.name])
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise ConfigError(f"{f.name}: {value!r} is not one of {', '.join(map(str, choices))}.")
            object.__setattr__(self, f.name, value)
        positive = ("lora_rank", "batch_size", "epochs", "gradient_accumulation_steps", "repeats",
                    "bucket_reso_steps", "sample_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1 (got {getattr(self, name)}).")
        for name in ("max_train_steps", "save_steps", "save_last_n", "keep_tokens", "lr_warmup_steps",
                     "sample_every_steps", "conv_rank", "min_snr_gamma", "noise_offset", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} cannot be negative (got {getattr(self, name)}).")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive (got {self.learning_rate}); 1e-4 is a good start.")
        if self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha must be positive (got {self.lora_alpha}); try 2 x lora_rank.")
        for name in ("lora_dropout", "caption_dropout_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1) (got {getattr(self, name)}).")
        if self.resolution < 64 or self.resolution % 8:
            raise ConfigError(f"resolution must be a multiple of 8 and at least 64 (got {self.resolution}).")
        if self.min_bucket_reso > self.max_bucket_reso:
            raise ConfigError("min_bucket_reso is larger than max_bucket_reso: swap them.")
        budget = self.memory_budget_gb.strip().lower()
        try:
            ok = budget in ("auto", "off") or float(budget) >= 0
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"memory_budget_gb must be a number of GB, auto or off (got {self.memory_budget_gb!r}).")
        self._validate_validation()
        self._validate_regularization()
        self._validate_optimizer()
        if self.lora_type == "dora" and self.offload == "blocks":
            raise ConfigError("lora_type: dora cannot use offload: blocks: DoRA reads each layer's whole weight for "
                              "its norm in every step. Use offload: none (base_precision: fp8 also saves memory).")
        if self.lokr_factor == 0 or self.lokr_factor < -1:
            raise ConfigError(f"lokr_factor must be -1 (as square as possible) or a positive size such as 8 "
                              f"(got {self.lokr_factor}).")
        if not self.target_modules:
            raise ConfigError("target_modules is empty: list at least one, e.g. [q_proj, v_proj].")

    def _validate_optimizer(self) -> None:
        """The schedules the optimizers' authors document; what an optimizer's own signature takes is checked when
        it is built (training/optimizers.py)."""
        own_schedule = {"adamw_schedulefree": "schedule-free AdamW replaces the schedule (lr_warmup_steps is its "
                                              "warm-up)"}
        if self.optimizer == "adafactor" and self.optimizer_args.get("relative_step", True):
            own_schedule["adafactor"] = "Adafactor with relative_step follows its own schedule (optimizer_args " \
                                        "relative_step=false for a fixed learning_rate and any lr_scheduler)"
        if self.optimizer in own_schedule and self.lr_scheduler not in ("constant", "constant_with_warmup"):
            raise ConfigError(f"lr_scheduler {self.lr_scheduler} with optimizer {self.optimizer}: "
                              f"{own_schedule[self.optimizer]}; set lr_scheduler: constant.")
        if self.optimizer == "prodigy":
            if self.learning_rate < 0.1 or (self.text_encoder_lr and self.text_encoder_lr < 0.1):
                raise ConfigError("optimizer prodigy estimates the step size itself and multiplies it by the learning "
                                  "rate: set learning_rate: 1.0 (and text_encoder_lr 1.0 or 0), as its authors do.")
            if self.lr_scheduler not in ("constant", "constant_with_warmup", "cosine"):
                raise ConfigError(f"lr_scheduler {self.lr_scheduler} with optimizer prodigy: its authors use "
                                  "constant or cosine; set one of them.")
        if self.loraplus_lr_ratio < 0:
            raise ConfigError(f"loraplus_lr_ratio cannot be negative (got {self.loraplus_lr_ratio}); 0 turns it off.")
        if self.loraplus_lr_ratio and self.lora_type in ("loha", "lokr"):
            raise ConfigError(f"loraplus_lr_ratio is for lora and dora (their up matrices); lora_type "
                              f"{self.lora_type} has no up matrix: set loraplus_lr_ratio: 0.")

    def _validate_validation(self) -> None:
        if not 0.0 <= self.validation_split <= 0.5:
            raise ConfigError(f"validation_split must be between 0 and 0.5 (got {self.validation_split}); "
                              "0.1 holds out a tenth of the images.")
        if self.validation_split and self.validation_dir:
            raise ConfigError("validation_split and validation_dir are both set: use one (validation_dir holds "
                              "images of its own; validation_split takes some of train_data_dir's).")
        if self.validation_dir and self.train_data_dir and \
                Path(self.validation_dir).resolve() == Path(self.train_data_dir).resolve():
            raise ConfigError("validation_dir is train_data_dir: validation needs images that are not trained on. "
                              "Use validation_split to hold some out, or another folder.")
        if self.validation_timesteps < 1:
            raise ConfigError(f"validation_timesteps must be at least 1 (got {self.validation_timesteps}).")
        if self.save_best and not (self.validation_split or self.validation_dir):
            raise ConfigError("save_best keeps the checkpoint with the lowest validation loss: set validation_split "
                              "(e.g. 0.1) or validation_dir too.")

    def _validate_regularization(self) -> None:
        if self.prior_loss_weight < 0:
            raise ConfigError(f"prior_loss_weight cannot be negative (got {self.prior_loss_weight}); 1 weighs the "
                              "class images as the training images.")
        if self.reg_generate < 0:
            raise ConfigError(f"reg_generate cannot be negative (got {self.reg_generate}); 0 turns it off.")
        if self.reg_generate and not (self.reg_data_dir and self.class_prompt):
            raise ConfigError("reg_generate makes class images from class_prompt into reg_data_dir: set both "
                              "(e.g. reg_data_dir: ./reg, class_prompt: a photo of a woman).")
        if self.reg_data_dir and self.train_data_dir and \
                Path(self.reg_data_dir).resolve() == Path(self.train_data_dir).resolve():
            raise ConfigError("reg_data_dir is train_data_dir: class images go in a folder of their own.")
        if self.mask_dir and not self.masked_loss:
            raise ConfigError("mask_dir is set but masked_loss is off: set masked_loss: true to train with the masks.")

    @property
    def validates(self) -> bool:
        """Whether the run measures a validation loss."""
        return bool(self.validation_split or self.validation_dir)

    # -- derived -----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The LoRA's file name without extension (output_name, else the output folder's name)."""
        return self.output_name or Path(self.output_dir).resolve().name or "lora"

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def field_help() -> Dict[str, Dict[str, Any]]:
    """Name → {help, group, choices, default, type} for every field: what UIs are generated from."""
    out = {}
    defaults = TrainConfig.__dataclass_fields__
    for name, tp in _field_types().items():
        f = defaults[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out[name] = {**f.metadata, "default": default, "type": _type_name(tp)}
    return out


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """Build a validated config; unknown keys are refused with the nearest valid key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"The config must be a mapping of key: value lines, not {type(data).__name__}.")
    names = list(_field_types())
    unknown = [k for k in data if k not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else " See configs/sd15_style.yaml for the valid keys."
        raise ConfigError(f"Unknown config key '{key}'.{hint}")
    return TrainConfig(**dict(data))


def load_config(path: Optional[str] = None, overrides: Iterable[str] = (), **extra: Any) -> TrainConfig:
    """Read a YAML file, apply `key=value` overrides (YAML-parsed), then keyword overrides."""
    import yaml

    data: Dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"Config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p} must hold key: value lines at the top level.")
        data.update(loaded or {})
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects key=value, got '{item}'.")
        data[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    data.update(extra)
    return config_from_dict(data)


# -- type coercion ---------------------------------------------------------------------------

def _mapping(name: str, value: Any) -> Dict[str, Any]:
    """A YAML mapping, or `key=value` pairs (comma- or space-separated, each value read as YAML) from a form or --set."""
    import yaml

    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    if isinstance(value, str):
        out: Dict[str, Any] = {}
        for pair in value.replace(",", " ").split():
            key, sep, raw = pair.partition("=")
            if not sep or not key:
                raise ConfigError(f"{name}: expected key=value pairs (e.g. d_coef=0.8, decouple=true), got {pair!r}.")
            out[key] = yaml.safe_load(raw)
        return out
    raise ConfigError(f"{name}: expected a mapping (key: value) or key=value pairs, got {value!r}.")


@functools.lru_cache(maxsize=None)
def _field_types() -> Dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (list, List):
        return f"list[{typing.get_args(tp)[0].__name__}]"
    if typing.get_origin(tp) in (dict, Dict):
        return "dict"
    return getattr(tp, "__name__", str(tp))


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Accept what YAML and form fields produce; refuse anything else with a clear message."""
    if typing.get_origin(tp) in (dict, Dict):
        return _mapping(name, value)
    if typing.get_origin(tp) in (list, List):
        (item_tp,) = typing.get_args(tp)
        if value is None:
            return []
        if isinstance(value, str):  # "q_proj, v_proj" from a form field or --set
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list of {item_tp.__name__}, got {value!r}.")
        return [_coerce(f"{name}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.strip().lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"{name}: expected true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a whole number, got {value!r}.")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        if isinstance(value, int):
            return value
        raise ConfigError(f"{name}: expected a whole number, got {value!r}.")
    if tp is float:
        # PyYAML reads `2e-4` (no dot) as a string: configs write learning rates that way.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{name}: expected a number, got {value!r}.")
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name}: expected text, got {value!r}.")
    return value
