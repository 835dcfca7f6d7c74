"""`lora_type: loha | lokr` (adapters/lycoris.py): peft's LoHa/LoKr layers, saved in the LyCORIS layout, and what each
host makes of the file.

The hosts' formulas are restated here from their source (research/hosts.md names the commits read) and checked
against the trained layers' own forward; ComfyUI's own code is also run when its source is at hand.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_dora import forward_with, layer_input
from test_export import ALL_TARGETS, unet_output

from lora_trainer.adapters import keymap
from lora_trainer.adapters.export import load_lora_file, lora_state_dict, read_lora, save_lora
from lora_trainer.adapters.lora import ADAPTER, add_lora_to_components, lora_parameters, set_lora_scale
from lora_trainer.adapters.lycoris import lycoris_layers
from lora_trainer.config import TrainConfig
from lora_trainer.errors import ConfigError, ModelError

ROOT = Path(__file__).resolve().parents[1]
COMFYUI = [ROOT / ".ci" / "envs" / "comfyui-src", ROOT / ".ci" / "envs" / "comfyui"]
BASE_CFG = dict(lora_rank=4, lora_alpha=8, conv_rank=2, conv_alpha=1, target_modules=ALL_TARGETS,
                train_text_encoder=True)
# The factorisations a LoKr takes: w2 as a product (rank 4), both whole (rank 64: no rank, scale 1), w1 a product too
VARIANTS = [("loha", {}), ("lokr", {}), ("lokr", {"lokr_factor": 4}), ("lokr", {"lora_rank": 64}),
            ("lokr", {"decompose_both": True, "lokr_factor": 8})]
IDS = ["loha", "lokr", "lokr-factor4", "lokr-whole", "lokr-decompose-both"]


def with_lycoris(base, lora_type, **cfg):
    """A copy of `base` with LoHa/LoKr on every layer kind, every factor random, as after some training."""
    components = copy.deepcopy(base)
    add_lora_to_components(components, TrainConfig(**{**BASE_CFG, **cfg}, lora_type=lora_type))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora_parameters(components.unet) + [p for te in components.text_encoders
                                                     for p in lora_parameters(te)]:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return components


def lycoris_modules(components):
    return {keymap.kohya_name(prefix, name): layer for prefix, model in keymap.named_models(components)
            for name, layer in lycoris_layers(model, ADAPTER).items()}


# -- the hosts' formulas, restated --------------------------------------------------------------------

def a1111(sd, key, weight, multiplier):
    """AUTOMATIC1111 1.10.1 `extensions-builtin/Lora/network_hada.py` / `network_lokr.py` `calc_updown`, then
    `network.py` `finalize_updown`: reshape to the weight, times `calc_scale()` (alpha / dim; 1.0 without a dim: a
    LoKr whose factors are both whole), times `multiplier()`. dim: hada_w1_b's rows; LoKr: lokr_w1_b's rows, then
    lokr_w2_b's if it has one."""
    w = {k.rsplit(".", 1)[1]: v for k, v in sd.items() if k.startswith(key + ".")}
    if "hada_w1_a" in w:
        dim = w["hada_w1_b"].shape[0]
        shape = [w["hada_w1_a"].size(0), w["hada_w1_b"].size(1)]
        rebuild = lambda up, down: (up.reshape(up.size(0), -1) @ down.reshape(down.size(0), -1)).reshape(shape)  # noqa
        updown = rebuild(w["hada_w1_a"], w["hada_w1_b"]) * rebuild(w["hada_w2_a"], w["hada_w2_b"])
    else:
        dim = w["lokr_w1_b"].shape[0] if "lokr_w1_b" in w else None
        dim = w["lokr_w2_b"].shape[0] if "lokr_w2_b" in w else dim
        w1 = w["lokr_w1"] if "lokr_w1" in w else w["lokr_w1_a"] @ w["lokr_w1_b"]
        w2 = w["lokr_w2"] if "lokr_w2" in w else w["lokr_w2_a"] @ w["lokr_w2_b"]
        shape = weight.shape if weight.dim() == 4 else [w1.size(0) * w2.size(0), w1.size(1) * w2.size(1)]
        if w2.dim() == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        updown = torch.kron(w1, w2.contiguous()).reshape(shape)
    if weight.numel() == updown.numel():
        updown = updown.reshape(weight.shape)
    scale = float(w["alpha"]) / dim if dim is not None and "alpha" in w else 1.0
    return weight + updown * scale * multiplier


def comfyui(sd, key, weight, strength):
    """ComfyUI 0.8.0 `comfy/weight_adapter/loha.py` / `lokr.py` `calculate_weight` (alpha read by `comfy/lora.py`):
    LoHa (w1_a @ w1_b) * (w2_a @ w2_b) with alpha / w1_b's rows; LoKr kron(w1, w2) with alpha / dim, dim set from
    w1_b when w1 is a product and then from w2_b when w2 is, 1.0 when neither; weight += strength · alpha · diff."""
    w = {k.rsplit(".", 1)[1]: v for k, v in sd.items() if k.startswith(key + ".")}
    alpha = float(w["alpha"]) if "alpha" in w else None
    if "hada_w1_a" in w:
        scale = alpha / w["hada_w1_b"].shape[0] if alpha is not None else 1.0
        diff = torch.mm(w["hada_w1_a"], w["hada_w1_b"]) * torch.mm(w["hada_w2_a"], w["hada_w2_b"])
    else:
        dim = None
        if "lokr_w1" in w:
            w1 = w["lokr_w1"]
        else:
            dim, w1 = w["lokr_w1_b"].shape[0], torch.mm(w["lokr_w1_a"], w["lokr_w1_b"])
        if "lokr_w2" in w:
            w2 = w["lokr_w2"]
        else:
            dim, w2 = w["lokr_w2_b"].shape[0], torch.mm(w["lokr_w2_a"], w["lokr_w2_b"])
        if len(w2.shape) == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        scale = alpha / dim if alpha is not None and dim is not None else 1.0
        diff = torch.kron(w1, w2)
    return weight + (strength * scale) * diff.reshape(weight.shape)


# Forge (read at dfdcbab6): `backend/patcher/lora.py` `merge_lora_to_weight`, whose "loha" and "lokr" branches are
# ComfyUI's calculate_weight above, line for line (the same dims, the same 1.0 without one).
HOSTS = {"a1111": a1111, "comfyui": comfyui, "forge": comfyui}


# -- config and bad input ----------------------------------------------------------------------------

def test_lora_type_takes_loha_and_lokr_and_bad_settings_are_one_line():
    assert TrainConfig(lora_type="lokr", lokr_factor=8, decompose_both=True).lokr_factor == 8
    with pytest.raises(ConfigError, match="lokr_factor must be -1 .* or a positive size"):
        TrainConfig(lora_type="lokr", lokr_factor=0)
    with pytest.raises(ConfigError, match="loraplus_lr_ratio is for lora and dora.*loha has no up matrix"):
        TrainConfig(lora_type="loha", loraplus_lr_ratio=16)
    with pytest.raises(ConfigError, match="lora_type: 'locon' is not one of lora, dora, loha, lokr"):
        TrainConfig(lora_type="locon")


def test_a_lokr_factor_that_divides_no_layer_is_one_line(tiny_sd1):
    with pytest.raises(ConfigError, match=r"lokr_factor 7 divides no dimension of the trained layers .* -1"):
        add_lora_to_components(copy.deepcopy(tiny_sd1), TrainConfig(**BASE_CFG, lora_type="lokr", lokr_factor=7))


def test_flux_refuses_loha_and_lokr_in_one_line():
    from lora_trainer.training.setup import check_flux_settings

    for kind in ("loha", "lokr"):
        with pytest.raises(ConfigError, match=f"lora_type {kind}: Flux LoRAs are trained as lora only"):
            check_flux_settings(TrainConfig(lora_type=kind))


# -- the layers ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("lora_type,cfg", VARIANTS, ids=IDS)
def test_the_layers_start_as_the_base_and_train_only_their_factors(tiny_sd1, lora_type, cfg):
    components = copy.deepcopy(tiny_sd1)
    before = unet_output(components)
    unet_params, te_params = add_lora_to_components(components, TrainConfig(**{**BASE_CFG, **cfg},
                                                                            lora_type=lora_type))
    assert torch.equal(unet_output(components), before)  # one factor starts at zero: ΔW = 0
    trainable = [p for m in [components.unet, *components.text_encoders] for p in m.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in unet_params + te_params}
    assert all(p.dtype == torch.float32 for p in trainable)
    names = {n.split(".")[-2] for n, p in components.unet.named_parameters() if p.requires_grad}
    assert names <= {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w1_a", "lokr_w1_b",
                     "lokr_w2", "lokr_w2_a", "lokr_w2_b"}
    kinds = {type(layer.get_base_layer()).__name__ for layer in lycoris_layers(components.unet, ADAPTER).values()}
    assert kinds == {"Linear", "Conv2d"}  # attention, ff and ResNet convs alike


@pytest.mark.parametrize("host", sorted(HOSTS))
@pytest.mark.parametrize("lora_type,cfg", VARIANTS, ids=IDS)
def test_every_host_applies_the_delta_the_layer_trained(tiny_sd1, lora_type, cfg, host):
    components = with_lycoris(tiny_sd1, lora_type, **cfg)
    set_lora_scale(components.models(), 0.7)
    sd = lora_state_dict(components, torch.float32)
    g = torch.Generator().manual_seed(1)
    layers = lycoris_modules(components)
    assert len(layers) > 20
    for key, layer in layers.items():
        weight = layer.get_base_layer().weight.detach()
        want = HOSTS[host](sd, key, weight, 0.7)
        x = layer_input(layer, g)
        with torch.no_grad():
            got = layer(x)
            expected = forward_with(layer, x, want)
        assert not torch.allclose(expected, forward_with(layer, x, weight), rtol=1e-3), key  # the delta is there
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=key)


def test_a_whole_lokr_scales_by_one_as_the_hosts_do_and_its_alpha_is_written(tiny_sd1):
    components = with_lycoris(tiny_sd1, "lokr", lora_rank=64, lora_alpha=8)
    sd = lora_state_dict(components, torch.float32)
    whole = [k for k in lycoris_modules(components) if f"{k}.lokr_w2" in sd and f"{k}.lokr_w1" in sd]
    assert whole
    for key in whole:
        layer = lycoris_modules(components)[key]
        assert layer.scaling[ADAPTER] == 1.0 and float(sd[f"{key}.alpha"]) == 8.0


# -- the file ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lora_type", ["loha", "lokr"])
def test_the_file_has_the_lycoris_layout_and_metadata(make_cfg, lora_type):
    from lora_trainer.callbacks import Callbacks
    from lora_trainer.model import build_tiny_components
    from lora_trainer.training.loop import train

    cfg = make_cfg(lora_type=lora_type, lokr_factor=4, max_train_steps=2, target_modules=["attn", "conv"],
                   conv_rank=2)
    path = train(cfg, Callbacks(), components=build_tiny_components("sd1")).lora_path
    tensors, meta = read_lora(path)
    parts = {k.rsplit(".", 1)[1] for k in tensors}
    assert parts >= ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"} if lora_type == "loha"
                     else {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"})
    assert not any("lora_down" in k or "lora_up" in k for k in tensors)
    assert meta["ss_network_module"] == "lycoris.kohya"
    args = json.loads(meta["ss_network_args"])
    assert args["algo"] == lora_type and args["conv_dim"] == "2"
    assert (args["factor"], args["decompose_both"]) == ("4", "False") if lora_type == "lokr" else "factor" not in args
    assert meta["ss_network_dim"] == "4"
    trained = [k for k in tensors if k.endswith(("hada_w2_a", "lokr_w1"))]  # the factor that starts at zero
    assert trained and any(tensors[k].abs().sum() > 0 for k in trained)  # the steps moved it


def test_a1111_key_check_matches_every_module(tiny_sd1, tiny_sd1_file, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    from safetensors import safe_open

    from lora_trainer_a1111.keycheck import module_names_from_state_dict, unmatched_keys

    with safe_open(str(tiny_sd1_file), framework="pt") as f:
        known = module_names_from_state_dict(f.keys())
    for lora_type in ("loha", "lokr"):
        sd = lora_state_dict(with_lycoris(tiny_sd1, lora_type), torch.float32)
        assert unmatched_keys(sd, known) == []


def test_comfyui_applies_the_file_with_its_own_code(tiny_sd1, tiny_sd1_file, tmp_path):
    """ComfyUI 0.8.0's key maps, loader and LoHa/LoKr adapters, in a process of their own: every key loads, and the
    weights it makes are the restated formula's."""
    if not (COMFYUI[0] / "comfy" / "lora.py").is_file():
        pytest.skip("no ComfyUI 0.8.0 source here (bash .ci/setup.sh comfyui)")
    for (lora_type, cfg), name in zip(VARIANTS, IDS):
        components = with_lycoris(tiny_sd1, lora_type, **cfg)
        sd = lora_state_dict(components, torch.float32)
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
        out = tmp_path / f"{name}-applied.safetensors"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, COMFYUI)), OMP_NUM_THREADS="1")
        done = subprocess.run([sys.executable, str(Path(__file__).with_name("comfy_dora_worker.py")),
                               str(tiny_sd1_file), str(tmp_path / f"{name}.safetensors"), "0.7", str(out)],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads(Path(f"{out}.json").read_text()) == [], name  # no "lora key not loaded"
        applied = load_file(str(out))
        layers = lycoris_modules(components)
        assert set(applied) == set(layers), name
        for key, layer in layers.items():
            weight = layer.get_base_layer().weight.detach()
            torch.testing.assert_close(applied[key].reshape(weight.shape), comfyui(sd, key, weight, 0.7),
                                       rtol=1e-5, atol=1e-5, msg=f"{name} {key}")


# -- continuing, resuming ------------------------------------------------------------------------------------

@pytest.mark.parametrize("lora_type,cfg", VARIANTS, ids=IDS)
def test_init_lora_from_a_loha_or_lokr_file_is_the_trained_model_bit_for_bit(tiny_sd1, tmp_path, lora_type, cfg):
    trained = with_lycoris(tiny_sd1, lora_type, **cfg)
    saved = lora_state_dict(trained, torch.float32)
    path = save_lora(tmp_path / "l.safetensors", saved, {})
    fresh = copy.deepcopy(tiny_sd1)
    unet_params, te_params = load_lora_file(fresh, path, trainable=True)
    assert torch.equal(unet_output(fresh), unet_output(trained))
    again = lora_state_dict(fresh, torch.float32)
    assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved)
    started = copy.deepcopy(tiny_sd1)  # a new run's parameters, in the order the optimizer state follows
    want = add_lora_to_components(started, TrainConfig(**{**BASE_CFG, **cfg}, lora_type=lora_type))
    assert [p.shape for p in unet_params + te_params] == [p.shape for p in want[0] + want[1]]
    assert all(p.requires_grad for p in unet_params + te_params)


def test_a_lokr_file_of_another_tools_factorisation_loads_exactly(tiny_sd1, tmp_path):
    """Mixed ranks and factorisations per module (as LyCORIS presets write them) load as they are."""
    a = lora_state_dict(with_lycoris(tiny_sd1, "lokr", lora_rank=2, target_modules=["to_q"]), torch.float32)
    b = lora_state_dict(with_lycoris(tiny_sd1, "lokr", lora_rank=64, lokr_factor=4, target_modules=["to_k"]),
                        torch.float32)
    path = save_lora(tmp_path / "mixed.safetensors", {**a, **b}, {})
    fresh = copy.deepcopy(tiny_sd1)
    load_lora_file(fresh, path)
    again = lora_state_dict(fresh, torch.float32)
    assert again.keys() == {**a, **b}.keys() and all(torch.equal(again[k], v) for k, v in {**a, **b}.items())


@pytest.mark.parametrize("lora_type", ["loha", "lokr"])
def test_resume_continues_a_run_exactly(make_cfg, lora_type):
    from lora_trainer.callbacks import Callbacks
    from lora_trainer.model import build_tiny_components
    from lora_trainer.training.loop import train

    class StopAt2(Callbacks):
        step = 0

        def on_loss(self, step, loss, lr):
            self.step = step

        def should_stop(self):
            return self.step >= 2

    common = dict(lora_type=lora_type, max_train_steps=4, save_steps=2, save_precision="fp32", lokr_factor=4,
                  train_text_encoder=True)
    straight = make_cfg(**common, output_dir=str(Path(make_cfg().output_dir).parent / "straight"))
    cut = make_cfg(**common)
    a = train(straight, Callbacks(), components=build_tiny_components("sd1")).lora_path
    assert train(cut, StopAt2(), components=build_tiny_components("sd1")).stopped
    b = train(cut, Callbacks(), components=build_tiny_components("sd1"), resume=cut.output_dir).lora_path
    first, second = load_file(str(a)), load_file(str(b))
    assert first.keys() == second.keys() and any(".hada_" in k or ".lokr_" in k for k in first)
    for key in first:
        assert torch.equal(first[key], second[key]), key


# -- merge, resize, convert --------------------------------------------------------------------------------

@pytest.mark.parametrize("lora_type,cfg", VARIANTS[:2] + VARIANTS[3:4], ids=["loha", "lokr", "lokr-whole"])
def test_merge_into_a_checkpoint_bakes_in_the_hosts_weight(tiny_sd1, tiny_sd1_file, tmp_path, lora_type, cfg):
    from lora_trainer.adapters.merge import merge_into_checkpoint
    from lora_trainer.model import load_components

    trained = with_lycoris(tiny_sd1, lora_type, **cfg)
    sd = lora_state_dict(trained, torch.float32)
    path = save_lora(tmp_path / "l.safetensors", sd, {})
    out = merge_into_checkpoint(tiny_sd1_file, [(path, 0.7)], tmp_path / "m.safetensors")
    layers = lycoris_modules(trained)
    expected = copy.deepcopy(tiny_sd1)
    for prefix, model in keymap.named_models(expected):
        modules = dict(model.named_modules())
        for key, name in keymap.reverse_table(prefix, list(modules)).items():
            if key in layers:
                modules[name].weight.data = a1111(sd, key, modules[name].weight.data, 0.7)
    for (_, want), (_, got) in zip(keymap.named_models(expected), keymap.named_models(load_components(out))):
        got_sd = got.state_dict()
        for k, v in want.state_dict().items():
            torch.testing.assert_close(got_sd[k], v, rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("lora_type", ["loha", "lokr"])
def test_resize_makes_a_lora_within_the_svd_error_of_the_delta(tiny_sd1, tmp_path, lora_type):
    from lora_trainer.adapters.resize import resize_lora_file

    trained = with_lycoris(tiny_sd1, lora_type)
    sd = lora_state_dict(trained, torch.float32)
    path = save_lora(tmp_path / "l.safetensors", sd, {"ss_base_model_version": "sd_v1"})
    out, table = resize_lora_file(path, tmp_path / "r.safetensors", rank=3, precision="fp32")
    resized, meta = read_lora(out)
    assert meta["ss_network_module"] == "networks.lora"
    layers = lycoris_modules(trained)
    assert {r.module for r in table} == set(layers)
    for key, layer in layers.items():
        weight = layer.get_base_layer().weight.detach()
        delta = (comfyui(sd, key, weight, 1.0) - weight).flatten(1).double()
        down, up = resized[f"{key}.lora_down.weight"], resized[f"{key}.lora_up.weight"]
        assert down.shape[0] == min(3, *delta.shape)
        if weight.dim() == 4 and weight.shape[2:] != (1, 1):
            assert down.shape[1:] == weight.shape[1:]  # a 3×3 conv's LoRA keeps its k×k down
        got = float(resized[f"{key}.alpha"]) / down.shape[0] * (up.flatten(1) @ down.flatten(1)).double()
        s = torch.linalg.svdvals(delta)
        best = float(s[down.shape[0]:].square().sum().sqrt())  # the error of the best rank-R approximation
        assert abs(float((got - delta).norm()) - best) <= 1e-4 * float(s.norm()) + 1e-6, key
    fresh = copy.deepcopy(tiny_sd1)
    load_lora_file(fresh, out)  # a plain LoRA now, loaded as one


def test_merging_loha_with_a_lora_needs_a_rank_and_then_sums_their_updates(tiny_sd1, tmp_path):
    from lora_trainer.adapters.resize import merge_lora_files

    loha = with_lycoris(tiny_sd1, "loha", target_modules=["to_q", "conv"])
    loha_sd = lora_state_dict(loha, torch.float32)
    loha_path = save_lora(tmp_path / "h.safetensors", loha_sd, {})
    with pytest.raises(ModelError, match="h.safetensors is a LoHa/LoKr file.*add --rank N"):
        merge_lora_files([(loha_path, 1.0)], tmp_path / "m.safetensors")
    out, _ = merge_lora_files([(loha_path, 0.5), (loha_path, 0.5)], tmp_path / "m.safetensors", rank=64,
                              precision="fp32")
    merged = load_file(str(out))
    for key, layer in lycoris_modules(loha).items():
        weight = layer.get_base_layer().weight.detach()
        down, up = merged[f"{key}.lora_down.weight"], merged[f"{key}.lora_up.weight"]
        if weight.dim() == 4 and weight.shape[2:] != (1, 1):
            assert down.shape[1:] == weight.shape[1:]  # 3×3 convs keep a conv LoRA's layout (1×1 ones read as 2-D)
        got = float(merged[f"{key}.alpha"]) / down.shape[0] * (up.flatten(1) @ down.flatten(1))
        torch.testing.assert_close(got.reshape(weight.shape), comfyui(loha_sd, key, weight, 1.0) - weight,
                                   rtol=1e-4, atol=1e-5, msg=key)


def test_convert_reads_a_peft_loha_file_into_the_lycoris_layout(tiny_sd1, tmp_path):
    """peft's own LoHa state dict (get_peft_model_state_dict: `hada_w1_a` without the adapter name, `unet.` prefix,
    alpha in adapter_config.json) converts to the file the trainer writes."""
    from peft import get_peft_model_state_dict

    from lora_trainer.cli import main

    trained = with_lycoris(tiny_sd1, "loha", lora_alpha=6, train_text_encoder=False, target_modules=["attn", "ff"])
    peft_sd = {f"unet.{k}": v.detach().clone() for k, v in get_peft_model_state_dict(trained.unet).items()}
    assert any(k.endswith(".hada_w1_a") for k in peft_sd)
    save_file(peft_sd, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA", "r": 4, "alpha": 6}))
    assert main(["convert", "--input", str(tmp_path / "adapter_model.safetensors"), "--output",
                 str(tmp_path / "k.safetensors"), "--save-precision", "fp32"]) == 0
    converted, meta = read_lora(tmp_path / "k.safetensors")
    ours = lora_state_dict(trained, torch.float32)
    assert converted.keys() == ours.keys()
    assert all(torch.equal(converted[k], ours[k]) for k in ours)
    assert json.loads(meta["ss_network_args"])["algo"] == "loha"


def test_the_example_config_loads_and_names_lokr_and_prodigy():
    from lora_trainer.config import load_config

    cfg = load_config(ROOT / "configs" / "sdxl_lokr_prodigy.yaml")
    assert (cfg.lora_type, cfg.optimizer, cfg.learning_rate, cfg.lokr_factor) == ("lokr", "prodigy", 1.0, 8)
