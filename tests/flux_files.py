"""Tiny random Flux.1 files in the layouts users download: the original transformer, clip_l, t5xxl, ae, T5's tokenizer.

Real architectures (diffusers' FluxTransformer2DModel, transformers' CLIP and T5, a 16-channel AutoencoderKL)
at a few dozen channels and one block each, written the way the released files are laid out, so the
trainer's loader reads them as it reads flux1-dev.safetensors and its companions.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ldm_layout import _hf_text_keys, vae_to_ldm
from lora_trainer.model.flux import original_module

WORDS = "a the of and in on with house red blue circle square background style demo_style teal photo".split()


# The widths of the tiny files, and of Flux.1's own (its transformer, with CLIP-L's and T5-XXL's output widths)
TINY = {"heads": 2, "head_dim": 16, "rope": (4, 6, 6), "clip": 32, "t5": 32}
FULL_WIDTH = {"heads": 24, "head_dim": 128, "rope": (16, 56, 56), "clip": 768, "t5": 4096}


def flux_transformer(variant: str = "schnell", seed: int = 0, layers: int = 1, single_layers: int = 1,
                     width: dict = TINY):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=layers, num_single_layers=single_layers,
                                  attention_head_dim=width["head_dim"], num_attention_heads=width["heads"],
                                  joint_attention_dim=width["t5"], pooled_projection_dim=width["clip"],
                                  guidance_embeds=variant == "dev", axes_dims_rope=width["rope"]).eval()


def to_original_layout(transformer) -> dict[str, torch.Tensor]:
    """diffusers' names → the original file's: split modules fused again (rows in order), norm_out swapped."""
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in transformer.state_dict().items():
        module, _, kind = key.rpartition(".")
        original, index, _count = original_module(module)
        name = f"{original}.{'scale' if original.endswith('_norm') else kind}"
        if original == "final_layer.adaLN_modulation.1":
            value = torch.cat(value.chunk(2)[::-1])
        pieces.setdefault(name, {})[index] = value
    return {name: torch.cat([parts[i] for i in sorted(parts)]).contiguous() for name, parts in pieces.items()}


def write_t5_tokenizer(folder: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    folder.mkdir(parents=True, exist_ok=True)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in WORDS] + \
        [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz_,.0123456789▁"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    try:
        space = {"replacement": "▁", "prepend_scheme": "always"}
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(**space), decoders.Metaspace(**space)
    except TypeError:  # tokenizers < 0.14 (the a1111 stack) spell it add_prefix_space
        space = {"replacement": "▁", "add_prefix_space": True}
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(**space), decoders.Metaspace(**space)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 512, "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>", "extra_ids": 0,
        "additional_special_tokens": [], "tokenizer_class": "T5Tokenizer"}), encoding="utf-8")
    return folder


def write_tiny_flux(folder: Path, variant: str = "schnell", seed: int = 0, all_in_one: bool = False,
                    width: dict = TINY, dtype: torch.dtype = torch.float32, layers: int = 1) -> dict:
    """{"base_model", "clip_l", "t5xxl", "vae", "t5_tokenizer"}: paths, as a config names them. `width`:
    FULL_WIDTH gives Flux.1's transformer widths (one block of each kind), with encoders of its input widths;
    `layers`: double blocks."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    folder.mkdir(parents=True, exist_ok=True)
    transformer = flux_transformer(variant, seed, layers=layers, width=width)
    torch.manual_seed(seed + 1)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=width["clip"], intermediate_size=37,
                                        num_hidden_layers=2, num_attention_heads=max(1, width["clip"] // 64),
                                        max_position_embeddings=77, hidden_act="quick_gelu",
                                        projection_dim=width["clip"], bos_token_id=0, eos_token_id=2))
    tokenizer = write_t5_tokenizer(folder / "t5_tokenizer")
    t5 = T5EncoderModel(T5Config(vocab_size=60, d_model=width["t5"], d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                                 tie_word_embeddings=False))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 16, 16),
                        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, use_quant_conv=False,
                        use_post_quant_conv=False)
    original = to_original_layout(transformer)
    ae = {k.removeprefix("first_stage_model."): v.contiguous() for k, v in vae_to_ldm(vae).items()}
    clip_sd = {k: v.contiguous() for k, v in _hf_text_keys(clip).items()}
    t5_sd = {k: v.contiguous() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    name = f"tiny-flux-{variant}"
    if all_in_one:  # ComfyUI's checkpoint: the transformer under model.diffusion_model., the encoders beside it
        original = {f"model.diffusion_model.{k}": v for k, v in original.items()}
        original.update({f"text_encoders.clip_l.transformer.{k}": v for k, v in clip_sd.items()})
        original.update({f"text_encoders.t5xxl.transformer.{k}": v for k, v in t5_sd.items()})
        original.update({f"vae.{k}": v for k, v in ae.items()})
        name += "-all-in-one"
    paths = {"base_model": folder / f"{name}.safetensors", "clip_l": folder / "clip_l.safetensors",
             "t5xxl": folder / "t5xxl_fp16.safetensors", "vae": folder / "ae.safetensors"}
    save_file({k: v.to(dtype) for k, v in original.items()}, str(paths["base_model"]))
    def half(tensors):
        return {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}

    save_file(half(clip_sd), str(paths["clip_l"]))
    save_file(half(t5_sd), str(paths["t5xxl"]))
    save_file(ae, str(paths["vae"]))
    return {**{k: str(v) for k, v in paths.items()}, "t5_tokenizer": str(tokenizer),
            "models": {"transformer": transformer, "clip": clip, "t5": t5, "vae": vae}}
