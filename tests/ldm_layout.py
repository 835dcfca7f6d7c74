"""Test-only: diffusers / transformers models → one state dict in the original single-file layout.

The inverse of what `lora_trainer.model` loads, written from the layout itself (the mapping of
diffusers' old `convert_diffusers_to_original_*` scripts, derived here from each model's config so
it fits tiny models too). A round trip through it proves the loader's conversion, because the two
directions are written independently: this one by tables, the loader by diffusers' converters.

Also writes diffusers folders, so one set of weights exists in all three forms the loader takes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

# Inside a UNet resnet: (diffusers, original)
_UNET_RESNET = (("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("norm2.", "out_layers.0."),
                ("conv2.", "out_layers.3."), ("time_emb_proj.", "emb_layers.1."), ("conv_shortcut.", "skip_connection."))
_VAE_RESNET = (("conv_shortcut.", "nin_shortcut."),)
_VAE_ATTENTION = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                  ("to_out.0.", "proj_out."))
_OPEN_CLIP_BLOCK = (("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."),
                    ("mlp.fc2.", "mlp.c_proj."), ("self_attn.out_proj.", "attn.out_proj."))
TEXT_PREFIXES = {
    "sd1": ["cond_stage_model.transformer."],
    "sd2": ["cond_stage_model.model."],
    "sdxl": ["conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."],
}


def _rename(key: str, prefixes: dict[str, tuple[str, tuple]]) -> str:
    """Apply the block table: a key under a diffusers prefix moves under the original one (+ inner renames)."""
    for old, (new, inner) in prefixes.items():
        if key.startswith(old):
            rest = key[len(old):]
            for a, b in inner:
                if rest.startswith(a):
                    rest = b + rest[len(a):]
                    break
            return new + rest
    raise KeyError(f"no original-layout name for {key}")


def unet_table(config) -> dict[str, tuple[str, tuple]]:
    """diffusers prefix → (original prefix, inner renames), from the UNet's config."""
    per = config.layers_per_block + 1  # original input/output blocks per level (the resnets + a down/up sampler)
    table = {"time_embedding.linear_1.": ("time_embed.0.", ()), "time_embedding.linear_2.": ("time_embed.2.", ()),
             "add_embedding.linear_1.": ("label_emb.0.0.", ()), "add_embedding.linear_2.": ("label_emb.0.2.", ()),
             "conv_in.": ("input_blocks.0.0.", ()), "conv_norm_out.": ("out.0.", ()), "conv_out.": ("out.2.", ()),
             "mid_block.resnets.0.": ("middle_block.0.", _UNET_RESNET),
             "mid_block.attentions.0.": ("middle_block.1.", ()),
             "mid_block.resnets.1.": ("middle_block.2.", _UNET_RESNET)}
    for i, kind in enumerate(config.down_block_types):
        for j in range(config.layers_per_block):
            table[f"down_blocks.{i}.resnets.{j}."] = (f"input_blocks.{i * per + j + 1}.0.", _UNET_RESNET)
            table[f"down_blocks.{i}.attentions.{j}."] = (f"input_blocks.{i * per + j + 1}.1.", ())
        table[f"down_blocks.{i}.downsamplers.0.conv."] = (f"input_blocks.{(i + 1) * per}.0.op.", ())
    for i, kind in enumerate(config.up_block_types):
        for j in range(per):
            table[f"up_blocks.{i}.resnets.{j}."] = (f"output_blocks.{i * per + j}.0.", _UNET_RESNET)
            table[f"up_blocks.{i}.attentions.{j}."] = (f"output_blocks.{i * per + j}.1.", ())
        slot = 2 if kind.startswith("CrossAttn") else 1  # the upsampler follows the attention, if any
        table[f"up_blocks.{i}.upsamplers.0."] = (f"output_blocks.{i * per + per - 1}.{slot}.", ())
    return table


def vae_table(config) -> dict[str, tuple[str, tuple]]:
    n = len(config.block_out_channels)
    table = {"encoder.conv_norm_out.": ("encoder.norm_out.", ()), "decoder.conv_norm_out.": ("decoder.norm_out.", ())}
    for part in ("encoder", "decoder"):
        table[f"{part}.mid_block.attentions.0."] = (f"{part}.mid.attn_1.", _VAE_ATTENTION)
        for j in range(2):
            table[f"{part}.mid_block.resnets.{j}."] = (f"{part}.mid.block_{j + 1}.", _VAE_RESNET)
    for i in range(n):
        for j in range(config.layers_per_block):
            table[f"encoder.down_blocks.{i}.resnets.{j}."] = (f"encoder.down.{i}.block.{j}.", _VAE_RESNET)
        table[f"encoder.down_blocks.{i}.downsamplers.0."] = (f"encoder.down.{i}.downsample.", ())
        for j in range(config.layers_per_block + 1):  # the original decoder numbers its levels bottom-up
            table[f"decoder.up_blocks.{i}.resnets.{j}."] = (f"decoder.up.{n - 1 - i}.block.{j}.", _VAE_RESNET)
        table[f"decoder.up_blocks.{i}.upsamplers.0."] = (f"decoder.up.{n - 1 - i}.upsample.", ())
    for same in ("encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.", "decoder.conv_out.",
                 "quant_conv.", "post_quant_conv."):
        table[same] = (same, ())
    return table


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    table = unet_table(unet.config)
    return {"model.diffusion_model." + _rename(k, table): v for k, v in unet.state_dict().items()}


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    table = vae_table(vae.config)
    out = {}
    for key, value in vae.state_dict().items():
        new = "first_stage_model." + _rename(key, table)
        if ".mid.attn_1." in new and new.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            value = value[:, :, None, None]  # the original attention uses 1x1 convolutions
        out[new] = value
    return out


def _hf_text_keys(encoder) -> dict[str, torch.Tensor]:
    """The encoder's state dict with transformers 4.x names (`text_model.…`), whatever version made it."""
    sd = encoder.state_dict()
    return {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v for k, v in sd.items()}


def clip_l_to_ldm(encoder, prefix: str) -> dict[str, torch.Tensor]:
    sd = _hf_text_keys(encoder)
    sd.setdefault("text_model.embeddings.position_ids", torch.arange(77).unsqueeze(0))  # real files carry it
    return {prefix + k: v for k, v in sd.items()}


def open_clip_to_ldm(encoder, prefix: str, extra_layer: bool) -> dict[str, torch.Tensor]:
    """OpenCLIP names, fused qkv, projection as a right-multiplied matrix; SD2 files hold one layer more."""
    sd = _hf_text_keys(encoder)
    out = {"logit_scale": torch.tensor(4.6052)}
    layers = encoder.config.num_hidden_layers
    for key, value in sd.items():
        if key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("text_model.final_layer_norm."):
            out["ln_final." + key.rsplit(".", 1)[1]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()
        elif key.startswith("text_model.encoder.layers."):
            index, rest = key[len("text_model.encoder.layers."):].split(".", 1)
            base = f"transformer.resblocks.{index}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                kind = rest.rsplit(".", 1)[1]
                if rest.startswith("self_attn.q_proj."):
                    out[f"{base}attn.in_proj_{kind}"] = torch.cat(
                        [sd[f"text_model.encoder.layers.{index}.self_attn.{p}_proj.{kind}"] for p in "qkv"])
                continue
            out[base + _rename(rest, {"": ("", _OPEN_CLIP_BLOCK)})] = value
    if extra_layer:  # SD2 conditions on the penultimate layer: the file still has the last one
        generator = torch.Generator().manual_seed(1)
        for key in [k for k in out if k.startswith(f"transformer.resblocks.{layers - 1}.")]:
            new = key.replace(f"resblocks.{layers - 1}.", f"resblocks.{layers}.")
            out[new] = torch.randn(out[key].shape, generator=generator)
        hidden = encoder.config.hidden_size
        out["text_projection"] = torch.randn(hidden, encoder.config.projection_dim, generator=generator)
    return {prefix + k: v for k, v in out.items()}


def components_to_ldm(components, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The whole model as a single-file state dict (what A1111/Forge hold, what a .safetensors stores)."""
    sd = {**unet_to_ldm(components.unet), **vae_to_ldm(components.vae)}
    prefixes = TEXT_PREFIXES[components.family]
    for encoder, prefix in zip(components.text_encoders, prefixes):
        if prefix.endswith(".transformer."):
            sd.update(clip_l_to_ldm(encoder, prefix))
        else:
            sd.update(open_clip_to_ldm(encoder, prefix, extra_layer=components.family == "sd2"))
    sd["alphas_cumprod"] = components.noise_scheduler.alphas_cumprod.clone()  # real files carry schedule buffers
    out = {}
    for k, v in sd.items():
        v = v.detach().clone().contiguous()
        out[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    return out


def save_ldm_file(components, path: Path, dtype: torch.dtype | None = None, extra: dict | None = None) -> Path:
    sd = components_to_ldm(components, dtype)
    sd.update(extra or {})
    save_file(sd, str(path))
    return Path(path)


def save_diffusers_folder(components, folder: Path) -> Path:
    """unet/, vae/, text_encoder(_2)/, tokenizer(_2)/, scheduler/ and model_index.json."""
    folder = Path(folder)
    sdxl = components.family == "sdxl"
    components.unet.save_pretrained(folder / "unet")
    components.vae.save_pretrained(folder / "vae")
    names = ["", "_2"] if sdxl else [""]
    for suffix, encoder, tokenizer in zip(names, components.text_encoders, components.tokenizers):
        encoder.save_pretrained(folder / f"text_encoder{suffix}")
        tokenizer.save_pretrained(str(folder / f"tokenizer{suffix}"))
    components.noise_scheduler.save_pretrained(folder / "scheduler")
    index = {"_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "DDPMScheduler"]}
    for suffix, cls in zip(names, ["CLIPTextModel", "CLIPTextModelWithProjection"]):
        index[f"text_encoder{suffix}"] = ["transformers", cls]
        index[f"tokenizer{suffix}"] = ["transformers", "CLIPTokenizer"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return folder
