"""LoRA files the hosts load: kohya keys and alpha for every layer, and diffusers' own loader agrees."""

import copy

import pytest
import torch
from safetensors import safe_open

from lora_trainer.adapters import keymap
from lora_trainer.config import TrainConfig
from lora_trainer.adapters.export import lora_state_dict, read_lora, save_lora, to_kohya
from lora_trainer.adapters.lora import add_lora_to_components, load_lora_into, lora_layers
from lora_trainer.model import build_tiny_components, encode_text, unet_added_cond

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "proj", "ff", "conv"]


def trained_like(family, **cfg):
    """Tiny components with LoRA whose up-weights are random, as after some training."""
    components = build_tiny_components(family, seed=3)
    config = TrainConfig(lora_rank=4, lora_alpha=8, conv_rank=2, conv_alpha=1, **cfg)
    add_lora_to_components(components, config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model in [components.unet, *components.text_encoders]:
            for layer in lora_layers(model).values():
                w = layer.lora_B["default"].weight
                w.copy_(torch.randn(w.shape, generator=g) * 0.05)
    return components


def pipeline_for(components):
    """diffusers' own pipeline around the components: its load_lora_weights is the reference loader."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    common = dict(vae=components.vae, unet=components.unet, scheduler=EulerDiscreteScheduler())
    if components.family == "sdxl":
        return StableDiffusionXLPipeline(text_encoder=components.text_encoders[0], tokenizer=components.tokenizers[0],
                                         text_encoder_2=components.text_encoders[1],
                                         tokenizer_2=components.tokenizers[1], **common)
    return StableDiffusionPipeline(text_encoder=components.text_encoders[0], tokenizer=components.tokenizers[0],
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False, **common)


def unet_output(components):
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        hidden, pooled = encode_text(components, ["a red circle"])
        added = unet_added_cond(components, pooled, [(64, 64)], [(0, 0)], [(64, 64)])
        return components.unet(sample, torch.tensor([500]), encoder_hidden_states=hidden,
                               added_cond_kwargs=added).sample


@pytest.mark.parametrize("family,te_prefixes", [("sd1", ["lora_te"]), ("sdxl", ["lora_te1", "lora_te2"])])
def test_every_targeted_layer_has_kohya_keys_and_real_alpha(family, te_prefixes):
    components = trained_like(family, target_modules=ALL_TARGETS, train_text_encoder=True)
    sd = lora_state_dict(components, torch.float32)
    expected = set()
    for prefix, model in [("lora_unet", components.unet), *zip(te_prefixes, components.text_encoders)]:
        for name, layer in lora_layers(model).items():
            key = keymap.kohya_name(prefix, name)
            expected.add(key)
            down, up = sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"]
            is_conv = name.rsplit(".", 1)[-1] in ("conv1", "conv2", "conv")
            rank, alpha = (2, 1.0) if is_conv else (4, 8.0)
            assert down.shape[0] == rank and up.shape[1] == rank, key
            assert float(sd[f"{key}.alpha"]) == alpha and sd[f"{key}.alpha"].dim() == 0, key
    assert {k.rsplit(".", 2)[0] if k.endswith("weight") else k.rsplit(".", 1)[0] for k in sd} == expected
    assert any(".attn1.to_q" in n or "_attn1_to_q" in n for n in expected)
    assert all("text_model_encoder_layers" in k for k in expected if not k.startswith("lora_unet"))
    if family == "sdxl":
        assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in expected)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_own_kohya_loader_gives_the_same_unet_output(family, tmp_path):
    from diffusers.utils import USE_PEFT_BACKEND

    if not USE_PEFT_BACKEND:  # transformers 4.30 (A1111's pin) is too old for diffusers' peft loader
        pytest.skip("diffusers' load_lora_weights needs its peft backend (transformers >= 4.34)")
    trained = trained_like(family, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "ff", "proj"])
    path = save_lora(tmp_path / "x.safetensors", lora_state_dict(trained, torch.float32), {"ss_network_dim": "4"})
    pipe = pipeline_for(build_tiny_components(family, seed=3))
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)  # a file path alone fails offline (0.31)
    fresh = copy.copy(trained)
    fresh.unet = pipe.unet
    expected = unet_output(trained)
    got = unet_output(fresh)
    assert not torch.allclose(expected, unet_output(build_tiny_components(family, seed=3)), atol=1e-4)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_saved_file_loads_back_into_the_same_model(family, tmp_path):
    trained = trained_like(family, target_modules=ALL_TARGETS, train_text_encoder=True)
    path = save_lora(tmp_path / "x.safetensors", lora_state_dict(trained, torch.float32), {})
    tensors, _ = read_lora(path)
    fresh = build_tiny_components(family, seed=3)
    load_lora_into(fresh, to_kohya(tensors, family, len(fresh.text_encoders), unet_config=fresh.unet.config))
    torch.testing.assert_close(unet_output(fresh), unet_output(trained))


def test_peft_named_file_converts_to_kohya(tmp_path):
    """A peft/diffusers-format file (unet.… lora_A/lora_B, no alpha) → the same layers in kohya names."""
    trained = trained_like("sd1", target_modules=["q_proj", "v_proj"])
    from peft import get_peft_model_state_dict

    peft_sd = {f"unet.{k}": v for k, v in get_peft_model_state_dict(trained.unet).items()}
    kohya = to_kohya(peft_sd, "sd1", 1, default_alpha=8)
    ours = lora_state_dict(trained, torch.float32)
    assert set(kohya) == set(ours)
    for k in ours:
        torch.testing.assert_close(kohya[k].float(), ours[k])


def test_a_finished_lora_is_never_overwritten(tmp_path):
    sd = {"lora_unet_x.lora_down.weight": torch.zeros(1, 2), "lora_unet_x.lora_up.weight": torch.zeros(2, 1),
          "lora_unet_x.alpha": torch.tensor(1.0)}
    first = save_lora(tmp_path / "a.safetensors", sd, {"n": "1"})
    second = save_lora(tmp_path / "a.safetensors", sd, {"n": "2"})
    assert (first.name, second.name) == ("a.safetensors", "a-v2.safetensors")
    with safe_open(str(first), "pt") as f:
        assert f.metadata()["n"] == "1"
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind
