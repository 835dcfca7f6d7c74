"""Flux.1 LoRAs: diffusers/peft files → the kohya Flux layout ComfyUI and Forge load, exactly.

The oracle is diffusers' own reader of kohya Flux files (`_convert_kohya_flux_lora_to_diffusers`): our
file read back by it must give every module the update it had, the fused qkv / linear1 split again.
"""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_trainer.adapters.flux_layout import flux_to_kohya
from lora_trainer.model.flux import original_module
from lora_trainer.cli.commands import main
from lora_trainer.errors import ModelError

pytestmark = pytest.mark.flux

WIDTH, MLP = 3072, 12288  # Flux.1's: diffusers' reader splits a single block's linear1 at these widths
RANK, ALPHA = 2, 4.0
MODULES = {  # diffusers module (under transformer.) → (out, in)
    "transformer_blocks.0.attn.to_q": (WIDTH, WIDTH), "transformer_blocks.0.attn.to_k": (WIDTH, WIDTH),
    "transformer_blocks.0.attn.to_v": (WIDTH, WIDTH), "transformer_blocks.0.attn.to_out.0": (WIDTH, WIDTH),
    "transformer_blocks.0.attn.add_q_proj": (WIDTH, WIDTH), "transformer_blocks.0.attn.add_k_proj": (WIDTH, WIDTH),
    "transformer_blocks.0.attn.add_v_proj": (WIDTH, WIDTH), "transformer_blocks.0.attn.to_add_out": (WIDTH, WIDTH),
    "transformer_blocks.0.ff.net.0.proj": (MLP, WIDTH), "transformer_blocks.0.ff.net.2": (WIDTH, MLP),
    "transformer_blocks.0.ff_context.net.0.proj": (MLP, WIDTH), "transformer_blocks.0.ff_context.net.2": (WIDTH, MLP),
    "single_transformer_blocks.0.attn.to_q": (WIDTH, WIDTH), "single_transformer_blocks.0.attn.to_k": (WIDTH, WIDTH),
    "single_transformer_blocks.0.attn.to_v": (WIDTH, WIDTH), "single_transformer_blocks.0.proj_mlp": (MLP, WIDTH),
    "single_transformer_blocks.0.proj_out": (WIDTH, WIDTH + MLP),
}


def peft_flux_lora(modules, seed=0):
    """A diffusers-format Flux LoRA (as ai-toolkit and diffusers' trainers write it), with random A and B."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (rows, cols) in modules.items():
        tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(RANK, cols, generator=gen) / cols ** 0.5
        tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(rows, RANK, generator=gen)
    return tensors


def delta(down, up, scale):
    return (up.double() @ down.double()) * scale


@pytest.mark.once  # the same on every stack: the newest runs it
def test_diffusers_reads_our_flux_file_back_with_every_update_unchanged(tmp_path):
    source = peft_flux_lora(MODULES)
    save_file(source, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": ALPHA}), encoding="utf-8")
    assert main(["convert", "--input", str(tmp_path / "adapter_model.safetensors"),
                 "--output", str(tmp_path / "flux_lora.safetensors"), "--save-precision", "fp32"]) == 0
    ours = load_file(str(tmp_path / "flux_lora.safetensors"))
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in ours
    assert ours["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * WIDTH + MLP, 4 * RANK)
    assert not any("transformer_blocks" in k for k in ours)

    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    back = _convert_kohya_flux_lora_to_diffusers(dict(ours))
    for name in MODULES:
        want = delta(source[f"transformer.{name}.lora_A.weight"], source[f"transformer.{name}.lora_B.weight"],
                     ALPHA / RANK)
        got = delta(back[f"transformer.{name}.lora_A.weight"], back[f"transformer.{name}.lora_B.weight"], 1.0)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
    with safe_open(str(tmp_path / "flux_lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == "flux-1-dev/lora"


def test_a_part_without_a_lora_adds_zero_rows_to_the_fused_module():
    only_q_v = {k: MODULES[k] for k in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v")}
    source = peft_flux_lora(only_q_v)
    parts = {k.rsplit(".lora_", 1)[0]: {"down": source[f"{k.rsplit('.lora_', 1)[0]}.lora_A.weight"],
                                          "up": source[f"{k.rsplit('.lora_', 1)[0]}.lora_B.weight"]}
             for k in source}
    out = flux_to_kohya(parts, default_alpha=ALPHA)
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    assert set(out) == {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"}
    fused = delta(out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"],
                  float(out[f"{name}.alpha"]) / out[f"{name}.lora_down.weight"].shape[0])
    q = delta(source["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"],
              source["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"], ALPHA / RANK)
    torch.testing.assert_close(fused[:WIDTH], q)
    assert not fused[WIDTH:2 * WIDTH].any()  # to_k had no LoRA
    assert fused.shape == (3 * WIDTH, WIDTH)


def test_norm_out_rows_are_swapped_into_the_original_order():
    assert original_module("norm_out.linear") == ("final_layer.adaLN_modulation.1", 0, 1)
    down, up = torch.randn(RANK, 8), torch.randn(16, RANK)
    out = flux_to_kohya({"transformer.norm_out.linear": {"down": down, "up": up}})
    fused = out["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"]
    torch.testing.assert_close(fused[:8], up[8:])  # diffusers (scale, shift) → original (shift, scale)
    torch.testing.assert_close(fused[8:], up[:8])


def test_a_real_tiny_flux_transformer_with_peft_converts_to_the_original_names(tmp_path):
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
               "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out"]
    model = inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets), model)
    tensors = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(model).items()}
    save_file(tensors, str(tmp_path / "tiny.safetensors"))
    assert main(["convert", "--input", str(tmp_path / "tiny.safetensors"), "--output", str(tmp_path / "k.safetensors"),
                 "--alpha", str(ALPHA)]) == 0
    names = {k.rsplit(".", 2)[0] if k.endswith("weight") else k.rsplit(".", 1)[0]
             for k in load_file(str(tmp_path / "k.safetensors"))}
    assert names == {f"lora_unet_double_blocks_0_{m}" for m in ("img_attn_qkv", "img_attn_proj", "txt_attn_qkv",
                                                                 "txt_attn_proj", "img_mlp_0", "img_mlp_2",
                                                                 "txt_mlp_0", "txt_mlp_2")} | \
        {"lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_0_linear2", "lora_unet_final_layer_linear"}


def test_a_module_flux_does_not_have_is_named():
    with pytest.raises(ModelError, match="transformer_blocks.0.attn.to_gate"):
        flux_to_kohya({"transformer.transformer_blocks.0.attn.to_gate": {"down": torch.zeros(1, 4),
                                                                          "up": torch.zeros(4, 1)}})
