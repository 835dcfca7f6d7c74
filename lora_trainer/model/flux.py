"""Flux.1 (dev and schnell) from the files users have: the original transformer, CLIP-L, T5-XXL and the VAE.

The transformer comes as Black Forest Labs ship it (`double_blocks.N.img_attn.qkv.weight`, …; ComfyUI's
all-in-one checkpoints under `model.diffusion_model.`). It is read tensor by tensor into diffusers'
`FluxTransformer2DModel`, whose depth and widths are read from the keys and shapes (as ComfyUI does), so
reduced and pruned files load too. The fused original modules are split into diffusers' rows here; the
same table maps a LoRA back (adapters/flux_layout.py). CLIP-L (`clip_l.safetensors`) and T5
(`t5xxl_fp16.safetensors`, fp8 too) are in transformers' own layout; the VAE (`ae.safetensors`) in the
original autoencoder layout that SD's VAE uses, with 16 latent channels.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterable, List, Mapping, Optional, Tuple

from ..errors import ModelError
from . import factory
from .checkpoint_file import CheckpointFile

if TYPE_CHECKING:
    import torch

    from .components import Components

PREFIX = "model.diffusion_model."
# original module in double_blocks.N → the diffusers modules of transformer_blocks.N, in the order of its rows
DOUBLE_BLOCK = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
    "img_attn.norm.query_norm": ("attn.norm_q",),
    "img_attn.norm.key_norm": ("attn.norm_k",),
    "txt_attn.norm.query_norm": ("attn.norm_added_q",),
    "txt_attn.norm.key_norm": ("attn.norm_added_k",),
}
# single_blocks.N → single_transformer_blocks.N
SINGLE_BLOCK = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
    "norm.query_norm": ("attn.norm_q",),
    "norm.key_norm": ("attn.norm_k",),
}
# Outside the blocks. final_layer.adaLN_modulation's rows are (shift, scale); diffusers' norm_out (scale, shift).
TOP_LEVEL = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
SWAPPED = "final_layer.adaLN_modulation.1"
MLP_RATIO = 4  # Flux.1: a single block's proj_mlp is 4 × the width (its share of linear1's rows)
CLIP_L, T5XXL, AE = ("CLIP-L text encoder (clip_l.safetensors)", "T5-XXL text encoder (t5xxl_fp16.safetensors)",
                     "Flux.1 autoencoder (ae.safetensors)")
T5_MAX_LENGTH = {"dev": 512, "schnell": 256}
VAE_SCALE, VAE_SHIFT = 0.3611, 0.1159  # Flux.1's autoencoder
FILES = {"clip_l": "clip_l.safetensors", "t5xxl": "t5xxl_fp16.safetensors (or t5xxl_fp8_e4m3fn.safetensors)",
         "vae": "ae.safetensors"}
WHERE = {"clip_l": "ComfyUI/models/text_encoders/ (Forge: models/text_encoder/)",
         "t5xxl": "ComfyUI/models/text_encoders/ (Forge: models/text_encoder/)",
         "vae": "ComfyUI/models/vae/ (Forge: models/VAE/)"}


def is_flux(keys: Iterable[str]) -> bool:
    """Whether checkpoint keys are a Flux.1 transformer (original layout, bare or all-in-one)."""
    return any(k.startswith(("double_blocks.", PREFIX + "double_blocks.")) for k in keys)


def is_flux_file(path: str | Path) -> bool:
    """Whether `path` is a .safetensors file holding a Flux.1 transformer (its header alone is read)."""
    path = Path(path).expanduser()
    return path.is_file() and path.suffix.lower() == ".safetensors" and is_flux(CheckpointFile(path))


def flux_variant(keys: Iterable[str]) -> str:
    """"dev" (guidance-distilled: it has a guidance embedding) or "schnell"."""
    return "dev" if any("guidance_in." in k for k in keys) else "schnell"


def original_module(diffusers_name: str) -> Optional[Tuple[str, int, int]]:
    """(original module, its row block, how many blocks) of a diffusers Flux module; None if Flux has none."""
    for blocks, original_blocks, table in (("transformer_blocks.", "double_blocks.", DOUBLE_BLOCK),
                                            ("single_transformer_blocks.", "single_blocks.", SINGLE_BLOCK)):
        if diffusers_name.startswith(blocks):
            number, _, rest = diffusers_name[len(blocks):].partition(".")
            for original, members in table.items():
                if rest in members:
                    return f"{original_blocks}{number}.{original}", members.index(rest), len(members)
            return None
    for original, name in TOP_LEVEL.items():
        if diffusers_name == name:
            return original, 0, 1
    return None


def transformer_config(file: Mapping) -> dict:
    """FluxTransformer2DModel's config from the original file's keys and shapes."""
    keys = list(file)

    def count(blocks: str) -> int:
        return len({k.split(".")[1] for k in keys if k.startswith(blocks)})

    width, in_channels = _shape(file, "img_in.weight")
    head_dim = _shape(file, "double_blocks.0.img_attn.norm.query_norm.scale")[0]
    side = 2 * (head_dim * 7 // 32)  # Flux.1's rope axes: (16, 56, 56) for 128-wide heads
    return {"patch_size": 1, "in_channels": in_channels, "num_layers": count("double_blocks."),
            "num_single_layers": count("single_blocks."), "attention_head_dim": head_dim,
            "num_attention_heads": width // head_dim, "joint_attention_dim": _shape(file, "txt_in.weight")[1],
            "pooled_projection_dim": _shape(file, "vector_in.in_layer.weight")[1],
            "guidance_embeds": "guidance_in.in_layer.weight" in file,
            "axes_dims_rope": [head_dim - 2 * side, side, side]}


def diffusers_transformer_weights(file: Mapping, dtype: "torch.dtype",
                                  matrix_dtype: "torch.dtype | None" = None) -> Dict[str, "torch.Tensor"]:
    """The original transformer's tensors under diffusers' names, each read, split and cast in turn."""
    import torch

    width = _shape(file, "img_in.weight")[0]
    out, unknown = {}, []
    for key in list(file):
        module, _, kind = key.rpartition(".")
        target = _diffusers_modules(module)
        if target is None:
            unknown.append(key)
            continue
        tensor = file.read(key) if isinstance(file, CheckpointFile) else file[key]
        if module.endswith(SWAPPED):
            tensor = torch.cat(tensor.chunk(2)[::-1])
        sizes = [width] * len(target)
        if len(target) == 4:  # single block linear1: q, k, v and the MLP's input
            sizes[3] = tensor.shape[0] - 3 * width
        name = "weight" if kind in ("weight", "scale") else kind
        layer = matrix_dtype is not None and kind == "weight" and tensor.dim() == 2
        for part, piece in zip(target, tensor.split(sizes) if len(target) > 1 else [tensor]):
            out[f"{part}.{name}"] = piece.to(matrix_dtype if layer else dtype).clone()
        del file[key]
    if unknown:
        raise ModelError(f"The Flux file has keys this loader does not know (e.g. {unknown[:3]}): it is not a "
                         "Flux.1 dev/schnell transformer in the original layout.")
    return out


def split_module(kohya_module: str) -> Optional[List[Tuple[str, int]]]:
    """The diffusers modules (each with its share of the fused rows, in widths) of an original Flux module named
    kohya-style, `double_blocks_0_img_attn_qkv`; None if Flux has no such module."""
    for blocks, table in (("double_blocks_", DOUBLE_BLOCK), ("single_blocks_", SINGLE_BLOCK)):
        if kohya_module.startswith(blocks):
            number, _, rest = kohya_module[len(blocks):].partition("_")
            original = next((o for o in table if o.replace(".", "_") == rest), None)
            if original is None:
                return None
            members = _diffusers_modules(f"{blocks[:-1]}.{number}.{original}")
            shares = [MLP_RATIO if m.endswith("proj_mlp") else 1 for m in members]
            return list(zip(members, shares))
    original = next((o for o in TOP_LEVEL if o.replace(".", "_") == kohya_module), None)
    return None if original is None else [(TOP_LEVEL[original], 1)]


def _diffusers_modules(original: str) -> Optional[List[str]]:
    for blocks, diffusers_blocks, table in (("double_blocks.", "transformer_blocks.", DOUBLE_BLOCK),
                                            ("single_blocks.", "single_transformer_blocks.", SINGLE_BLOCK)):
        if original.startswith(blocks):
            number, _, rest = original[len(blocks):].partition(".")
            members = table.get(rest)
            return None if members is None else [f"{diffusers_blocks}{number}.{m}" for m in members]
    return [TOP_LEVEL[original]] if original in TOP_LEVEL else None


def _shape(file: Mapping, key: str, what: str = "Flux.1 transformer") -> tuple:
    if key not in file:
        where = f" ({file.path.name})" if isinstance(file, CheckpointFile) else ""
        raise ModelError(f"The file{where} has no {key}: it is not a {what}.")
    return tuple(file.shape(key)) if isinstance(file, CheckpointFile) else tuple(file[key].shape)


def clip_config(file: Mapping) -> dict:
    """CLIPTextModel's config (CLIP-L's activations and 64-wide heads) from a transformers-layout file."""
    vocab, width = _shape(file, "text_model.embeddings.token_embedding.weight", CLIP_L)
    layers = len({k.split(".")[3] for k in file if k.startswith("text_model.encoder.layers.")})
    return {"vocab_size": vocab, "hidden_size": width, "num_hidden_layers": layers,
            "num_attention_heads": max(1, width // 64),
            "intermediate_size": _shape(file, "text_model.encoder.layers.0.mlp.fc1.weight", CLIP_L)[0],
            "max_position_embeddings": _shape(file, "text_model.embeddings.position_embedding.weight", CLIP_L)[0],
            "hidden_act": "quick_gelu", "projection_dim": width, "bos_token_id": 0, "eos_token_id": 2}


def t5_config(file: Mapping) -> dict:
    """T5EncoderModel's config (T5 v1.1: gated GELU) from a transformers-layout file."""
    vocab, width = _shape(file, "shared.weight", T5XXL)
    inner = _shape(file, "encoder.block.0.layer.0.SelfAttention.q.weight", T5XXL)[0]
    buckets, heads = _shape(file, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", T5XXL)
    return {"vocab_size": vocab, "d_model": width, "d_kv": inner // heads, "num_heads": heads,
            "d_ff": _shape(file, "encoder.block.0.layer.1.DenseReluDense.wi_0.weight", T5XXL)[0],
            "num_layers": len({k.split(".")[2] for k in file if k.startswith("encoder.block.")}),
            "relative_attention_num_buckets": buckets, "feed_forward_proj": "gated-gelu",
            "is_encoder_decoder": False, "use_cache": False, "tie_word_embeddings": False}


def vae_config(file: Mapping) -> dict:
    """AutoencoderKL's config for the original-layout Flux autoencoder (16 latent channels, no quant convs)."""
    levels = sorted({int(k.split(".")[2]) for k in file if k.startswith("encoder.down.")})
    channels = [_shape(file, f"encoder.down.{i}.block.0.conv1.weight", AE)[0] for i in levels]
    per_level = len({k.split(".")[4] for k in file if k.startswith("encoder.down.0.block.")})
    return {"in_channels": 3, "out_channels": 3, "latent_channels": _shape(file, "encoder.conv_out.weight", AE)[0] // 2,
            "block_out_channels": channels, "layers_per_block": per_level,
            "down_block_types": ["DownEncoderBlock2D"] * len(channels),
            "up_block_types": ["UpDecoderBlock2D"] * len(channels),
            "norm_num_groups": min(32, min(channels)), "use_quant_conv": False, "use_post_quant_conv": False,
            "scaling_factor": VAE_SCALE, "shift_factor": VAE_SHIFT, "sample_size": 1024}


# Where ComfyUI's all-in-one Flux checkpoints keep the other parts (its supported_models.Flux prefixes)
EMBEDDED = {"clip_l": "text_encoders.clip_l.transformer.", "t5xxl": "text_encoders.t5xxl.transformer.",
            "vae": "vae."}
# a part's source (a file, or a state dict in memory: a host's all-in-one weights) and its keys' prefix in it
Part = Tuple["Path | Mapping", str]


def flux_files(base_model: "str | Path | Mapping", parts: Mapping[str, str]) -> Dict[str, Part]:
    """The transformer and each of clip_l, t5xxl and vae: the file the config names, else the part inside an
    all-in-one checkpoint (a file, or a host's state dict); one line naming every part that is neither."""
    source = base_model if isinstance(base_model, Mapping) else Path(base_model).expanduser()
    keys = list(source if isinstance(source, Mapping) else CheckpointFile(source))
    found: Dict[str, Part] = {"transformer": (source, PREFIX if any(k.startswith(PREFIX) for k in keys) else "")}
    missing = []
    for part, name in FILES.items():
        given = (parts.get(part) or "").strip()
        if given and not Path(given).expanduser().is_file():
            missing.append(f"{part} not found: {given}")
        elif given:
            found[part] = (Path(given).expanduser(), "")
        elif any(k.startswith(EMBEDDED[part]) for k in keys):
            found[part] = (source, EMBEDDED[part])
        else:
            missing.append(f"{part} ({name}, in {WHERE[part]}) is not set")
    if missing:
        what = source.name if isinstance(source, Path) else "The model"
        raise ModelError(f"{what} is a Flux.1 transformer; its other files are needed too: "
                         + "; ".join(missing) + ". Set them in the config (clip_l, t5xxl, vae).")
    return found


def part_of_file(path: str | Path) -> Optional[str]:
    """Which Flux part a separate file is, from its header: "clip_l", "t5xxl", "vae", or None (a host's list of
    text encoders and VAEs names files, not parts)."""
    path = Path(path).expanduser()
    if not (path.is_file() and path.suffix.lower() in (".safetensors", ".sft")):
        return None
    keys = {k.removeprefix("transformer.") for k in CheckpointFile(path)}
    if "text_model.embeddings.token_embedding.weight" in keys:
        return "clip_l"
    if "shared.weight" in keys or "encoder.embed_tokens.weight" in keys:
        return "t5xxl"
    if "encoder.conv_out.weight" in keys and "decoder.conv_out.weight" in keys:
        return "vae"
    return None


def open_part(part: Part, dtype: "torch.dtype | None" = None) -> "CheckpointFile | dict":
    """A part's tensors under their own names: of an all-in-one file, only that part's keys, its prefix removed.
    From a state dict: a dict of the same tensors (`dtype` is then the loader's to apply)."""
    source, prefix = part
    if isinstance(source, Mapping):
        return {k[len(prefix):]: source[k] for k in source if k.startswith(prefix)}
    file = CheckpointFile(source, dtype)
    if prefix:
        for key in [k for k in file if not k.startswith(prefix)]:
            del file[key]
        file.rename(lambda k: k[len(prefix):])
    return file


def open_clip_l(part: Part, dtype: "torch.dtype | None" = None) -> "CheckpointFile | dict":
    clip = open_part(part, dtype)
    if isinstance(clip, dict):  # ComfyUI's own saves keep a transformer. level
        return {k.removeprefix("transformer."): v for k, v in clip.items()}
    clip.rename(lambda k: k.removeprefix("transformer."))
    return clip


def flux_configs(files: Mapping[str, Part]) -> Dict[str, dict]:
    """The configs of the transformer, CLIP-L, T5 and VAE that `flux_files` found, from their headers alone."""
    return {"transformer": transformer_config(open_part(files["transformer"])),
            "clip": clip_config(open_clip_l(files["clip_l"])), "t5": t5_config(open_part(files["t5xxl"])),
            "vae": vae_config(open_part(files["vae"]))}


def load_flux(base_model: "str | Mapping", parts: Mapping[str, str], dtype: "torch.dtype", vae_dtype: "torch.dtype",
              matrix_dtype: "torch.dtype | None" = None, name: Optional[str] = None,
              consume: bool = False) -> "Components":
    """Components of a Flux.1 model: FluxTransformer2DModel as `unet`, [CLIP-L, T5] as the text encoders.

    base_model: the transformer's file, or a host's state dict in ComfyUI's all-in-one layout (what
    `state_dict_for_saving` gives for a Flux MODEL, CLIP and VAE): left untouched, or emptied as it is
    read when `consume` (the host's copies become the training copy)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from .hashing import file_sha256, state_dict_fingerprint
    from .text_convert import match_model_layout

    files = flux_files(base_model, parts)
    source = open_part(files["transformer"])
    parts_of = {part: open_part(files[part], vae_dtype if part == "vae" else dtype) for part in ("t5xxl", "vae")}
    clip_file = open_clip_l(files["clip_l"], dtype)
    in_memory = isinstance(base_model, Mapping)
    if in_memory and consume:
        base_model.clear()  # the parts hold the tensors now: each is freed once it is in its model
    copy = in_memory and not consume
    path = files["transformer"][0]
    model_hash = state_dict_fingerprint([source]) if in_memory else file_sha256(path)
    variant = flux_variant(source)
    with factory.weights_skipped(True):
        transformer = FluxTransformer2DModel.from_config(transformer_config(source))
    factory.load_weights(transformer, diffusers_transformer_weights(source, dtype, matrix_dtype), "Flux transformer",
                         dtype, False, matrix_dtype)
    t5_file, vae_file = parts_of["t5xxl"], parts_of["vae"]
    with factory.weights_skipped(True):
        clip = CLIPTextModel(CLIPTextConfig.from_dict(clip_config(clip_file)))
        t5 = T5EncoderModel(T5Config.from_dict(t5_config(t5_file)))
    clip_weights = match_model_layout(_without(clip_file, "text_projection.", "logit_scale"), clip.state_dict())
    factory.load_weights(clip, clip_weights, "CLIP-L (clip_l)", dtype, copy)
    t5_weights = _without(t5_file, "decoder.", "lm_head.")
    t5_weights.setdefault("encoder.embed_tokens.weight", t5_weights["shared.weight"])
    factory.load_weights(t5, t5_weights, "T5 (t5xxl)", dtype, copy)
    config = vae_config(vae_file)
    with factory.weights_skipped(True):
        vae = AutoencoderKL.from_config(config)
    factory.load_weights(vae, convert_ldm_vae_checkpoint(dict(vae_file.items()), config), "VAE (vae)", vae_dtype,
                         copy)
    if in_memory:
        return flux_components(transformer, vae, clip, t5, variant, parts.get("t5_tokenizer", ""),
                               name or "in-memory", model_hash, "<in-memory>")
    return flux_components(transformer, vae, clip, t5, variant, parts.get("t5_tokenizer", ""), name or path.stem,
                           model_hash, str(path))


def flux_components(transformer, vae, clip, t5, variant: str, t5_tokenizer: str, name: str, model_hash,
                    source: str) -> "Components":
    from diffusers import FlowMatchEulerDiscreteScheduler

    from .components import Components
    from .tokenizers import load_clip_tokenizer, load_t5_tokenizer

    return Components(family="flux", unet=transformer, vae=vae, text_encoders=[clip, t5],
                      tokenizers=[load_clip_tokenizer("<|endoftext|>"), load_t5_tokenizer(t5_tokenizer)],
                      noise_scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0 if variant == "dev" else 1.0),
                      prediction_type="flow", name=name, model_hash=model_hash, source=source, variant=variant)


def _without(file: CheckpointFile, *prefixes: str) -> dict:
    # position_ids: a buffer every transformers builds itself; some files store it, some as floats
    return {k: file[k] for k in file if not k.startswith(prefixes) and not k.endswith(".position_ids")}


def pack_latents(latents: "torch.Tensor") -> "torch.Tensor":
    """(b, c, h, w) → (b, h/2 · w/2, 4c): Flux's 2×2 patches as tokens (FluxPipeline's order)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: "torch.Tensor", c: int, h: int, w: int) -> "torch.Tensor":
    b = tokens.shape[0]
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def latent_ids(h: int, w: int, device: object) -> "torch.Tensor":
    """Each packed token's (0, row, column): the image positions Flux's rotary embedding reads."""
    import torch

    ids = torch.zeros(h // 2, w // 2, 3, device=device)
    ids[..., 1] = torch.arange(h // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device)[None, :]
    return ids.reshape(-1, 3)
