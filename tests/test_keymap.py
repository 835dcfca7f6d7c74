"""The one key map: module names ⇄ kohya names, and foreign LoRA spellings → kohya."""

import pytest
import torch

from lora_trainer.adapters import keymap
from lora_trainer.errors import ModelError
from lora_trainer.adapters.export import to_kohya


def test_unet_and_text_encoder_names():
    assert keymap.kohya_name("lora_unet", "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0") == \
        "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_out_0"
    # transformers 5 CLIPTextModel drops `text_model.`; 4.x and CLIPTextModelWithProjection keep it.
    with_level = keymap.kohya_name("lora_te", "text_model.encoder.layers.3.self_attn.q_proj")
    without = keymap.kohya_name("lora_te", "encoder.layers.3.self_attn.q_proj")
    assert with_level == without == "lora_te_text_model_encoder_layers_3_self_attn_q_proj"


def test_text_encoder_prefixes_per_family():
    assert keymap.text_encoder_prefixes("sd1", 1) == ["lora_te"]
    assert keymap.text_encoder_prefixes("sd2", 1) == ["lora_te"]
    assert keymap.text_encoder_prefixes("sdxl", 2) == ["lora_te1", "lora_te2"]


def test_reverse_table_resolves_underscored_names():
    names = ["down_blocks.0.attentions.0.proj_in", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"]
    table = keymap.reverse_table("lora_unet", names)
    assert table["lora_unet_down_blocks_0_attentions_0_proj_in"] == names[0]
    assert table["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"] == names[1]


@pytest.mark.parametrize("key,expected", [
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
     ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "down")),
    ("base_model.model.up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0.lora_B.weight",
     ("lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_out_0", "up")),
    ("unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight",
     ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0", "down")),
    ("text_encoder.text_model.encoder.layers.0.self_attn.v_proj.lora_A.weight",
     ("lora_te_text_model_encoder_layers_0_self_attn_v_proj", "down")),
    ("lora_unet_down_blocks_0_attentions_0_proj_in.alpha",
     ("lora_unet_down_blocks_0_attentions_0_proj_in", "alpha")),
])
def test_foreign_keys_map_to_kohya(key, expected):
    module, part = keymap.split_lora_key(key)
    assert (keymap.foreign_to_kohya(module, ["lora_te"]), part) == expected


def test_to_kohya_keeps_alpha_or_uses_rank():
    down, up = torch.randn(4, 8), torch.randn(8, 4)
    peft = {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": down,
            "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": up}
    out = to_kohya(peft, "sd1", 1)
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert torch.equal(out[f"{name}.lora_down.weight"], down)
    assert float(out[f"{name}.alpha"]) == 4.0  # peft files carry no alpha: scale 1 = alpha rank
    assert float(to_kohya(peft, "sd1", 1, default_alpha=8)[f"{name}.alpha"]) == 8.0
    sdxl = to_kohya({"text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": down,
                     "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_B.weight": up}, "sdxl", 2)
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight" in sdxl


def test_to_kohya_refuses_a_file_with_no_lora_weights():
    with pytest.raises(ModelError, match="No LoRA weights found"):
        to_kohya({"model.diffusion_model.out.2.weight": torch.zeros(1)}, "sd1", 1)
