"""`lora_type: dora`: DoRA per input column (dora.py), saved as kohya `dora_scale`, and what each host makes of it.

The hosts' formulas are restated here from their source (research/hosts.md names the commits read) and checked
against the trained layers' own forward; ComfyUI's is also run for real when its source is at hand.
"""

import copy
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from test_export import ALL_TARGETS, unet_output

from lora_trainer.adapters import keymap
from lora_trainer.config import TrainConfig
from lora_trainer.adapters.dora import decomposed
from lora_trainer.errors import ConfigError, ModelError
from lora_trainer.adapters.export import build_metadata, load_lora_file, lora_state_dict, read_lora, save_lora, to_kohya
from lora_trainer.adapters.keymap import named_models
from lora_trainer.adapters.lora import ADAPTER, add_lora_to_components, dora_module, lora_layers, set_lora_scale

ROOT = Path(__file__).resolve().parents[1]
COMFYUI = [ROOT / ".ci" / "envs" / "comfyui-src", ROOT / ".ci" / "envs" / "comfyui"]
EPS = torch.finfo(torch.float32).eps
DORA_CFG = dict(lora_rank=4, lora_alpha=8, conv_rank=2, conv_alpha=1, target_modules=ALL_TARGETS,
                train_text_encoder=True)


def with_lora(base, lora_type="dora", **cfg):
    """A copy of `base` with LoRA on every layer kind, up weights random and DoRA magnitudes moved off the weights'
    column norms, as after some training."""
    components = copy.deepcopy(base)
    add_lora_to_components(components, TrainConfig(**DORA_CFG, lora_type=lora_type, **cfg))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model in [components.unet, *components.text_encoders]:
            for layer in lora_layers(model).values():
                up = layer.lora_B[ADAPTER].weight
                up.copy_(torch.randn(up.shape, generator=g) * 0.05)
                if dora_module(layer) is not None:
                    dora_module(layer).weight.mul_(0.9 + 0.2 * torch.rand(dora_module(layer).weight.shape,
                                                                          generator=g))
    return components


def all_layers(components):
    """{kohya module: peft LoRA layer} of every wrapped layer."""
    return {keymap.kohya_name(prefix, name): layer for prefix, model in named_models(components)
            for name, layer in lora_layers(model).items()}


def lora_diff(sd, key, shape):
    """up @ down in the weight's shape, and alpha / rank: what every host computes first."""
    down, up = sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"]
    return (up.flatten(1) @ down.flatten(1)).reshape(shape), float(sd[f"{key}.alpha"]) / down.shape[0]


def columns(weight):
    """The norm of each input column (a conv's over out × k × k), shaped (1, in[, 1, 1]) to scale `weight`, as
    all three hosts write it: transpose, flatten, norm, transpose back."""
    norm = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1, keepdim=True)
    return norm.reshape(weight.shape[1], *[1] * (weight.dim() - 1)).transpose(0, 1)


def rows(weight):
    """The norm of each output row, shaped to scale `weight`."""
    return weight.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))


def forward_with(layer, x, weight):
    """What the layer's base computes with `weight` in place of its own: F.linear / F.conv2d."""
    base = layer.get_base_layer()
    if isinstance(base, torch.nn.Conv2d):
        return F.conv2d(x, weight, base.bias, base.stride, base.padding, base.dilation, base.groups)
    return F.linear(x, weight, base.bias)


def layer_input(layer, g):
    base = layer.get_base_layer()
    if isinstance(base, torch.nn.Conv2d):
        return torch.randn(2, base.in_channels, 6, 6, generator=g)
    return torch.randn(3, base.in_features, generator=g)


# -- the hosts' formulas, restated --------------------------------------------------------------------

def a1111(dora_scale, weight, diff, alpha, multiplier):
    """AUTOMATIC1111 1.10.1 `extensions-builtin/Lora/network.py`: `NetworkModule.finalize_updown` scales up @ down
    by `calc_scale()` (alpha / rank), `apply_weight_decompose` takes W + that over the norm of each input column
    (always; no eps) times dora_scale, minus W, and the result is scaled by `multiplier()`; `networks.py` adds it to
    W."""
    merged = weight + alpha * diff
    updown = merged * (dora_scale / columns(merged)) - weight
    return weight + updown * multiplier


def comfyui(dora_scale, weight, diff, alpha, strength):
    """ComfyUI 0.8.0 `comfy/weight_adapter/base.py` `weight_decompose`: the axis from dora_scale.shape[0] (== out:
    output rows, normalised by ‖W‖ alone); on the input axis the norm of each column of W + alpha · diff, plus eps;
    then W + strength · (that − W)."""
    calc = weight + alpha * diff
    norm = rows(weight) if dora_scale.shape[0] == calc.shape[0] else columns(calc)
    calc = calc * (dora_scale / (norm + EPS))
    return weight + strength * (calc - weight)


def forge(dora_scale, weight, diff, alpha, strength):
    """Forge dfdcbab6 `backend/patcher/lora.py` `weight_decompose` (after ComfyUI v0.3.77): the same axis test; the
    input-axis branch, the one a file of ours takes: column norms of W + alpha · diff, plus eps."""
    assert dora_scale.shape[0] != weight.shape[0]  # not the output axis
    calc = weight + alpha * diff
    calc = calc * (dora_scale / (columns(calc) + EPS))
    return weight + strength * (calc - weight)


HOSTS = {"a1111": a1111, "comfyui": comfyui, "forge": forge}


# -- config ------------------------------------------------------------------------------------------

def test_lora_type_is_one_of_the_four_and_dora_refuses_block_offload():
    assert TrainConfig().lora_type == "lora" and TrainConfig(lora_type="dora").lora_type == "dora"
    with pytest.raises(ConfigError, match="lora_type: 'locon' is not one of lora, dora, loha, lokr"):
        TrainConfig(lora_type="locon")
    with pytest.raises(ConfigError, match="dora cannot use offload: blocks"):
        TrainConfig(lora_type="dora", offload="blocks")


def test_memory_plan_never_offloads_a_dora_run():
    from lora_trainer.training.plan import _change_steps

    assert {"offload": "blocks"} in _change_steps(TrainConfig(), torch.device("cuda"))
    assert {"offload": "blocks"} not in _change_steps(TrainConfig(lora_type="dora"), torch.device("cuda"))


# -- the layer ---------------------------------------------------------------------------------------

def test_magnitudes_are_trainable_parameters_of_the_model_in_the_returned_lists(tiny_sd1):
    components = copy.deepcopy(tiny_sd1)
    unet_params, te_params = add_lora_to_components(components, TrainConfig(**DORA_CFG, lora_type="dora"))
    for model, params in ((components.unet, unet_params), (components.text_encoders[0], te_params)):
        magnitudes = [p for n, p in model.named_parameters() if n.endswith("lora_input_magnitude.weight")]
        assert len(magnitudes) == len(lora_layers(model)) > 0
        assert {id(p) for p in magnitudes} <= {id(p) for p in params}  # the optimizer's and DDP's lists
        assert all(p.requires_grad and p.dtype == torch.float32 for p in magnitudes)
    for layer in lora_layers(components.unet).values():  # m starts as W's column norms: s = 1
        weight = layer.get_base_layer().weight
        assert dora_module(layer).weight.shape == (weight.shape[1],)
        assert torch.equal(dora_module(layer).weight, weight.transpose(0, 1).flatten(1).norm(dim=1))


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_the_layers_forward_is_the_base_with_the_hosts_weight_for_linear_and_conv(tiny_sd1, strength):
    trained = with_lora(tiny_sd1)
    set_lora_scale([trained.unet, *trained.text_encoders], strength)
    sd = lora_state_dict(trained, torch.float32)
    g = torch.Generator().manual_seed(3)
    kinds = set()
    with torch.no_grad():
        for key, layer in all_layers(trained).items():
            weight = layer.get_base_layer().weight
            kinds.add(type(layer.get_base_layer()).__name__)
            diff, alpha = lora_diff(sd, key, weight.shape)
            x = layer_input(layer, g)
            for host, formula in HOSTS.items():
                want = formula(sd[f"{key}.dora_scale"], weight, diff, alpha, strength)
                torch.testing.assert_close(layer(x), forward_with(layer, x, want), rtol=1e-5, atol=1e-5,
                                           msg=f"{host} {key}")
                torch.testing.assert_close(dora_module(layer).effective_weight(layer, strength), want, rtol=1e-5,
                                           atol=1e-6, msg=f"{host} {key}")
            assert not torch.allclose(want, weight + strength * alpha * diff, atol=1e-4)  # DoRA, not plain LoRA
    assert kinds == {"Linear", "Conv2d"}


def test_strength_zero_is_the_base_model_exactly_and_one_restores_it(tiny_sd1):
    trained = with_lora(tiny_sd1)
    models = [trained.unet, *trained.text_encoders]
    full = unet_output(trained)
    set_lora_scale(models, 0.0)
    assert torch.equal(unet_output(trained), unet_output(tiny_sd1))
    set_lora_scale(models, 1.0)
    assert torch.equal(unet_output(trained), full)


def test_training_moves_the_magnitudes_and_the_norm_is_detached(tiny_sd1):
    components = copy.deepcopy(tiny_sd1)
    unet_params, _ = add_lora_to_components(components, TrainConfig(lora_type="dora",
                                                                    target_modules=["q_proj", "conv"]))
    layers = list(lora_layers(components.unet).values())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in layers:  # some ΔW, so the norm depends on up and down
            up = layer.lora_B[ADAPTER].weight
            up.copy_(torch.randn(up.shape, generator=g) * 0.05)
    before = [dora_module(layer).weight.detach().clone() for layer in layers]
    optimizer = torch.optim.AdamW(unet_params, lr=1e-2)
    unet_output_with_grad(components).square().mean().backward()
    # (a self-attention over one token, the tiny mid block's, has no gradient for its query at all: skipped)
    learning = [x for x in layers if x.lora_B[ADAPTER].weight.grad.abs().sum() > 0]
    assert len(learning) >= len(layers) - 1
    assert all(dora_module(layer).weight.grad.abs().sum() > 0 for layer in learning)
    optimizer.step()
    assert all(not torch.equal(dora_module(layer).weight, b) for layer, b in zip(layers, before)
               if layer in learning)


def unet_output_with_grad(components):
    from lora_trainer.model import encode_text

    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden, _ = encode_text(components, ["a red circle"])
    return components.unet(sample, torch.tensor([500]), encoder_hidden_states=hidden).sample


def test_the_input_scaling_has_exact_gradients_and_keeps_small_changes_in_half_precision():
    from lora_trainer.adapters.dora import ScaleChannels

    for shape, dim in (((3, 5), -1), ((2, 4, 5), -1), ((2, 5, 3, 3), -3), ((5, 3, 3), -3)):
        x = torch.randn(shape, dtype=torch.double, requires_grad=True)
        s = torch.rand(5, dtype=torch.double, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a, b, dim=dim: ScaleChannels.apply(a, b, dim), (x, s))
    x = torch.randn(64, 8, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    scaled = ScaleChannels.apply(x, torch.full((8,), 1.003), -1)  # bf16 has no 1.003: 1.0 and 1.0078 around it
    assert scaled.dtype == torch.bfloat16
    assert abs(float((scaled.float() / x.float()).mean()) - 1.003) < 5e-4


@pytest.mark.parametrize("storage", [torch.float8_e4m3fn, torch.bfloat16], ids=["fp8", "bf16"])
def test_dora_on_stored_base_weights_starts_as_the_base_and_trains(tiny_sd1, storage):
    """base_precision fp8 (or bf16 on the CPU): weights stored in another dtype than the one computed in; the norm is
    taken of the stored weight cast to fp32, layer by layer."""
    from lora_trainer.model.precision import store_base_weights

    components = copy.deepcopy(tiny_sd1)
    components.unet.requires_grad_(False)  # frozen, as the loader gives it
    store_base_weights([components.unet], storage, torch.float32)
    before = unet_output(components)
    add_lora_to_components(components, TrainConfig(lora_type="dora", target_modules=["q_proj", "conv"],
                                                   lora_dropout=0.1))
    layers = lora_layers(components.unet)
    assert layers and all(layer.get_base_layer().weight.dtype == storage for layer in layers.values())
    for layer in layers.values():
        weight = layer.get_base_layer().weight.float()
        assert torch.equal(dora_module(layer).weight.detach(), weight.transpose(0, 1).flatten(1).norm(dim=1))
    torch.testing.assert_close(unet_output(components), before)
    conv = next(x for x in layers.values() if isinstance(x.get_base_layer(), torch.nn.Conv2d))
    torch.nn.init.normal_(conv.lora_B[ADAPTER].weight, std=0.05)
    conv.train()  # dropout on
    conv(torch.randn(1, conv.get_base_layer().in_channels, 4, 4)).square().mean().backward()
    assert dora_module(conv).weight.grad.abs().sum() > 0 and conv.lora_B[ADAPTER].weight.grad.abs().sum() > 0


# -- the file ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_every_dora_layer_saves_its_magnitude_as_an_input_axis_fp32_dora_scale(family, request):
    components = with_lora(request.getfixturevalue(f"tiny_{family}"))
    sd = lora_state_dict(components, torch.float16)
    scales = [k for k in sd if k.endswith(".dora_scale")]
    assert len(scales) == sum(k.endswith(".lora_down.weight") for k in sd) > 0
    for key, layer in all_layers(components).items():
        weight = layer.get_base_layer().weight
        scale = sd[f"{key}.dora_scale"]
        assert scale.dtype == torch.float32 and scale.shape == (1, weight.shape[1], *[1] * (weight.dim() - 2))
        assert torch.equal(scale.flatten(), dora_module(layer).weight.detach())


def test_comfyui_applies_the_file_with_its_own_code(tiny_sd1, tiny_sd1_file, tmp_path):
    """ComfyUI 0.8.0's key maps, loader and weight_decompose, run in a process of their own: every key of a DoRA and
    of a plain file loads, and the weights it makes are the restated formula's and the trained layers'."""
    if not (COMFYUI[0] / "comfy" / "lora.py").is_file():
        pytest.skip("no ComfyUI 0.8.0 source here (bash .ci/setup.sh comfyui)")
    for lora_type in ("dora", "lora"):
        components = with_lora(tiny_sd1, lora_type)
        sd = lora_state_dict(components, torch.float32)
        save_file({**sd, "lora_unet_nowhere.lora_up.weight": torch.zeros(2, 1)},  # a key it must report
                  str(tmp_path / f"{lora_type}.safetensors"))
        out = tmp_path / f"{lora_type}-applied.safetensors"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, COMFYUI)), OMP_NUM_THREADS="1")
        done = subprocess.run([sys.executable, str(Path(__file__).with_name("comfy_dora_worker.py")),
                               str(tiny_sd1_file), str(tmp_path / f"{lora_type}.safetensors"), "0.7", str(out)],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads(Path(f"{out}.json").read_text()) == ["lora_unet_nowhere.lora_up.weight"]
        applied = load_file(str(out))
        layers = all_layers(components)
        assert set(applied) == set(layers)
        for key, layer in layers.items():
            weight = layer.get_base_layer().weight.detach()
            diff, alpha = lora_diff(sd, key, weight.shape)
            if lora_type == "dora":
                want = comfyui(sd[f"{key}.dora_scale"], weight, diff, alpha, 0.7)
                torch.testing.assert_close(dora_module(layer).effective_weight(layer, 0.7), want, rtol=1e-5,
                                           atol=1e-6, msg=key)
            else:
                want = weight + 0.7 * alpha * diff
            torch.testing.assert_close(applied[key].reshape(weight.shape), want, rtol=1e-5, atol=1e-6, msg=key)


def test_a1111_key_check_matches_every_dora_module(tiny_sd1, tiny_sd1_file, monkeypatch):
    """(ComfyUI's loader takes every key: test_comfyui_applies_the_file_with_its_own_code.)"""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    from lora_trainer_a1111.keycheck import module_names_from_state_dict, unmatched_keys

    keys = list(lora_state_dict(with_lora(tiny_sd1), torch.float32))
    assert any(k.endswith(".dora_scale") for k in keys)
    assert unmatched_keys(keys, module_names_from_state_dict(load_file(str(tiny_sd1_file)).keys())) == []


def test_the_a1111_and_forge_tabs_train_dora(monkeypatch, tmp_path, tiny_sd1_file, make_cfg):
    import webui_stubs

    from lora_trainer.callbacks import Callbacks

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    for forge in (False, True):
        webui_stubs.install(monkeypatch, tmp_path / str(forge), Path(tiny_sd1_file), types.SimpleNamespace(),
                            forge=forge)
        import lora_trainer.training.loop as core
        from lora_trainer_a1111.host import A1111Backend

        seen = []
        monkeypatch.setattr(core, "train", lambda cfg, callbacks=None, host=None, resume=None: seen.append(cfg) or "trained")
        assert A1111Backend().train(make_cfg(lora_type="dora"), Callbacks()) == "trained"
        assert [cfg.lora_type for cfg in seen] == ["dora"]


def test_metadata_says_dora_per_input_column_the_way_lycoris_records_it():
    from lora_trainer.adapters.export import network_metadata

    components = types.SimpleNamespace(family="sd1", prediction_type="epsilon", name="base",
                                       resolved_hash=lambda: "0" * 64)
    meta = build_metadata(TrainConfig(lora_type="dora", conv_rank=2, conv_alpha=1), components, {})
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"]) == {"algo": "lora", "dora_wd": "True", "wd_on_output": "False",
                                                   "conv_dim": "2", "conv_alpha": "1.0"}
    plain = build_metadata(TrainConfig(), components, {})
    assert plain["ss_network_module"] == "networks.lora" and plain["ss_network_args"] == "{}"
    assert network_metadata(False, {"conv_dim": 2})["ss_network_args"] == '{"conv_dim": 2}'
    assert json.loads(network_metadata(True, on_output=True)["ss_network_args"])["wd_on_output"] == "True"


# -- reading it back ---------------------------------------------------------------------------------

def test_init_lora_from_a_dora_file_is_the_trained_model_bit_for_bit(tiny_sd1, tmp_path):
    trained = with_lora(tiny_sd1)
    saved = lora_state_dict(trained, torch.float32)
    path = save_lora(tmp_path / "d.safetensors", saved, {})
    fresh = copy.deepcopy(tiny_sd1)
    unet_params, te_params = load_lora_file(fresh, path, trainable=True)
    assert torch.equal(unet_output(fresh), unet_output(trained))
    again = lora_state_dict(fresh, torch.float32)
    assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved)
    started = copy.deepcopy(tiny_sd1)  # a new run's parameters, in the order the optimizer state follows
    want = add_lora_to_components(started, TrainConfig(**DORA_CFG, lora_type="dora"))
    assert [p.shape for p in unet_params + te_params] == [p.shape for p in want[0] + want[1]]
    assert all(p.requires_grad for p in unet_params + te_params)


def test_resume_continues_a_dora_run_exactly_and_training_moves_the_magnitudes(make_cfg):
    from lora_trainer.callbacks import Callbacks
    from lora_trainer.errors import ResumeError
    from lora_trainer.model import build_tiny_components
    from lora_trainer.training.state import load_state
    from lora_trainer.training.loop import train

    class StopAt2(Callbacks):
        step = 0

        def on_loss(self, step, loss, lr):
            self.step = step

        def should_stop(self):
            return self.step >= 2

    straight = make_cfg(lora_type="dora", max_train_steps=4, save_steps=2, save_precision="fp32",
                        output_dir=str(Path(make_cfg().output_dir).parent / "straight"))
    cut = make_cfg(lora_type="dora", max_train_steps=4, save_steps=2, save_precision="fp32")
    a = train(straight, Callbacks(), components=build_tiny_components("sd1")).lora_path
    assert train(cut, StopAt2(), components=build_tiny_components("sd1")).stopped
    with pytest.raises(ResumeError, match=r"lora_type \('dora' → 'lora'\)"):
        load_state(Path(cut.output_dir), cut.replace(lora_type="lora"), "")
    b = train(cut, Callbacks(), components=build_tiny_components("sd1"), resume=cut.output_dir).lora_path
    first, second = load_file(str(a)), load_file(str(b))
    assert first.keys() == second.keys() and any(k.endswith(".dora_scale") for k in first)
    for key in first:
        assert torch.equal(first[key], second[key]), key
    untrained = build_tiny_components("sd1")
    add_lora_to_components(untrained, straight)
    start = lora_state_dict(untrained, torch.float32)  # m = the column norms of W
    moved = [k for k in first if k.endswith(".dora_scale") and not torch.equal(first[k], start[k])]
    assert moved and len(moved) == sum(k.endswith(".dora_scale") for k in first)


def peft_dora_state_dict(base):
    """A peft DoRA (use_dora: one magnitude per output row) UNet state dict, as peft saves it, and peft's own merged
    weights {kohya module: (W, W')}."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    unet = copy.deepcopy(base.unet)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k"], use_dora=True), unet)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in unet.named_modules():
            if hasattr(module, "lora_magnitude_vector") and "default" in module.lora_B:
                module.lora_B["default"].weight.copy_(torch.randn(module.lora_B["default"].weight.shape,
                                                                  generator=g) * 0.05)
                magnitude = module.lora_magnitude_vector["default"].weight
                magnitude.mul_(0.9 + 0.2 * torch.rand(magnitude.shape, generator=g))
    peft_sd = {f"unet.{k}": v.detach().clone() for k, v in get_peft_model_state_dict(unet).items()}
    merged = {}
    for name, module in unet.named_modules():
        if hasattr(module, "lora_magnitude_vector") and "default" in module.lora_B:
            weight = module.get_base_layer().weight.detach().clone()
            module.merge(adapter_names=["default"])
            merged[keymap.kohya_name(keymap.UNET_PREFIX, name)] = (weight,
                                                                   module.get_base_layer().weight.detach().clone())
    return peft_sd, merged


def test_a_peft_dora_file_converts_to_an_output_axis_file_that_merges_but_does_not_train(tiny_sd1, tiny_sd1_file,
                                                                                         tmp_path):
    from lora_trainer.cli.commands import main
    from lora_trainer.adapters.merge import load_lora

    peft_sd, merged = peft_dora_state_dict(tiny_sd1)
    save_file(peft_sd, str(tmp_path / "peft.safetensors"))
    assert main(["convert", "--input", str(tmp_path / "peft.safetensors"), "--output",
                 str(tmp_path / "kohya.safetensors"), "--alpha", "8"]) == 0
    tensors, meta = read_lora(tmp_path / "kohya.safetensors")
    args = json.loads(meta["ss_network_args"])
    assert meta["ss_network_module"] == "lycoris.kohya" and args["dora_wd"] == "True" and args["wd_on_output"] == "True"
    assert sum(k.endswith(".dora_scale") for k in tensors) == sum(k.endswith(".lora_down.weight") for k in tensors)
    with pytest.raises(ModelError, match="scales output channels.*merge --base"):
        load_lora_file(copy.deepcopy(tiny_sd1), tmp_path / "kohya.safetensors")
    lora = load_lora(tmp_path / "kohya.safetensors", 0.7, "sd1")
    for key, (weight, want) in merged.items():  # merge --base: W + S · (peft's W' − W), the norm of W + ΔW
        torch.testing.assert_close(lora.merged_into(key, weight), weight + 0.7 * (want - weight), rtol=1e-5,
                                   atol=1e-6, msg=key)
    assert to_kohya(peft_sd, "sd1", 1, default_alpha=8).keys() == tensors.keys()


def test_a_file_mixing_dora_and_plain_layers_is_refused(tiny_sd1):
    from lora_trainer.adapters.lora import load_lora_into

    sd = lora_state_dict(with_lora(tiny_sd1), torch.float32)
    sd.pop(next(k for k in sd if k.endswith("attn1_to_q.dora_scale")))
    with pytest.raises(ModelError, match="mixes DoRA and plain LoRA layers"):
        load_lora_into(copy.deepcopy(tiny_sd1), sd)


# -- merge and resize --------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_merge_into_a_checkpoint_bakes_in_the_hosts_weight_at_the_strength(family, request, tmp_path):
    from lora_trainer.adapters.merge import merge_into_checkpoint
    from lora_trainer.model import load_components

    base = request.getfixturevalue(f"tiny_{family}")
    trained = with_lora(base)
    sd = lora_state_dict(trained, torch.float32)
    path = save_lora(tmp_path / "d.safetensors", sd, {})
    out = merge_into_checkpoint(request.getfixturevalue(f"tiny_{family}_file"), [(path, 0.7)],
                                tmp_path / "m.safetensors")
    layers = all_layers(trained)
    expected = copy.deepcopy(base)
    for prefix, model in named_models(expected):
        modules = dict(model.named_modules())
        for key, name in keymap.reverse_table(prefix, list(modules)).items():
            if key in layers:
                weight = modules[name].weight.data
                diff, alpha = lora_diff(sd, key, weight.shape)
                want = a1111(sd[f"{key}.dora_scale"], weight, diff, alpha, 0.7)
                torch.testing.assert_close(dora_module(layers[key]).effective_weight(layers[key], 0.7), want,
                                           rtol=1e-5, atol=1e-6, msg=key)
                modules[name].weight.data = want
    for (_, want), (_, got) in zip(named_models(expected), named_models(load_components(out))):
        got_sd = got.state_dict()
        for k, v in want.state_dict().items():
            torch.testing.assert_close(got_sd[k], v, rtol=1e-5, atol=1e-5, msg=k)


def test_merge_formula_is_the_hosts_on_both_axes():
    g = torch.Generator().manual_seed(0)
    for shape in ((6, 5), (6, 5, 3, 3)):
        weight, diff = torch.randn(shape, generator=g), torch.randn(shape, generator=g) * 0.1
        by_column = torch.rand(1, shape[1], *[1] * (len(shape) - 2), generator=g) + 0.5
        torch.testing.assert_close(decomposed(weight, 2.0 * diff, by_column, 0.6),
                                   a1111(by_column, weight, diff, 2.0, 0.6), rtol=1e-5, atol=1e-6)
        by_row = torch.rand(shape[0], *[1] * (len(shape) - 1), generator=g) + 0.5
        merged = weight + 2.0 * diff  # LyCORIS (locon.py apply_weight_decompose, wd_on_output): ‖W + ΔW‖ per row
        torch.testing.assert_close(decomposed(weight, 2.0 * diff, by_row, 0.6),
                                   weight + 0.6 * (merged * by_row / (rows(merged) + EPS) - weight))


def test_merging_dora_without_a_base_is_refused_and_resize_keeps_the_magnitudes(tiny_sd1, tmp_path):
    from lora_trainer.adapters.resize import merge_lora_files, resize_lora_file

    path = save_lora(tmp_path / "d.safetensors", lora_state_dict(with_lora(tiny_sd1), torch.float32), {})
    with pytest.raises(ModelError, match="d.safetensors is a DoRA file.*checkpoint \\(--base\\)"):
        merge_lora_files([(path, 1.0)], tmp_path / "merged.safetensors")
    same, _ = resize_lora_file(path, tmp_path / "r.safetensors", rank=4, precision="fp16")
    tensors, meta = read_lora(same, with_tensors=False)
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"])["wd_on_output"] == \
        "False"
    kept, original_sd = load_file(str(same)), load_file(str(path))
    for key in (k for k in original_sd if k.endswith(".dora_scale")):
        assert kept[key].dtype == torch.float32 and torch.equal(kept[key], original_sd[key]), key
    original, resized = copy.deepcopy(tiny_sd1), copy.deepcopy(tiny_sd1)
    load_lora_file(original, path)
    load_lora_file(resized, same)  # the full rank: the same direction update, the same magnitudes
    torch.testing.assert_close(unet_output(resized), unet_output(original), rtol=1e-3, atol=1e-4)


@pytest.mark.once  # the same on every stack: the newest runs it
def test_two_processes_train_dora_as_one_process_at_twice_the_batch(tmp_path):
    """DDP (lora_trainer/training/distributed.py) syncs the magnitudes' gradients as it does the LoRA weights', UNet and text
    encoder (test_distributed.py's equivalence, shorter)."""
    from ldm_layout import save_ldm_file
    from test_distributed import assert_same_lora, cli, finish, write_config

    from lora_trainer.cli.commands import main
    from lora_trainer.cli.demo_data import make_demo_images
    from lora_trainer.model import build_tiny_components

    base = save_ldm_file(build_tiny_components("sd1", seed=0), tmp_path / "tiny-sd1.safetensors")
    images = make_demo_images(tmp_path / "data")
    settings = dict(lora_type="dora", max_train_steps=3, lr_warmup_steps=0, save_steps=0, validation_dir="",
                    train_text_encoder=True)
    code, _, stderr = finish(cli("--config", str(write_config(tmp_path / "two.yaml", images, base, tmp_path / "two",
                                                              **settings)), "--gpus", "2"))
    assert code == 0, stderr
    assert main(["train", "--config", str(write_config(tmp_path / "one.yaml", images, base, tmp_path / "one",
                                                       batch_size=6, **settings))]) == 0
    assert_same_lora(tmp_path / "two" / "lora.safetensors", tmp_path / "one" / "lora.safetensors")
    first = load_file(str(tmp_path / "two" / "lora.safetensors"))
    assert any(k.startswith("lora_te_") and k.endswith(".dora_scale") for k in first)
