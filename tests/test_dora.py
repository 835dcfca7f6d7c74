"""`lora_type: dora`: peft's DoRA trained, saved as kohya `dora_scale`, and what each host makes of that file.

The hosts' formulas are restated here from their source (research/hosts.md names the commits read) and checked
against peft's own merged DoRA weight; ComfyUI's is also run for real when its source is at hand.
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
from safetensors.torch import load_file, save_file
from test_export import ALL_TARGETS, unet_output

from lora_trainer import keymap
from lora_trainer.config import TrainConfig
from lora_trainer.dora import decomposed
from lora_trainer.errors import ConfigError, ModelError
from lora_trainer.export import build_metadata, load_lora_file, lora_state_dict, read_lora, save_lora, to_kohya
from lora_trainer.keymap import named_models
from lora_trainer.lora import ADAPTER, add_lora_to_components, dora_module, lora_layers, set_lora_scale

ROOT = Path(__file__).resolve().parents[1]
COMFYUI = [ROOT / ".ci" / "envs" / "comfyui-src", ROOT / ".ci" / "envs" / "comfyui"]
EPS = torch.finfo(torch.float32).eps


def with_lora(base, lora_type="dora", **cfg):
    """A copy of `base` with LoRA on every layer kind, up weights random and DoRA magnitudes moved off the weights'
    norms, as after some training."""
    components = copy.deepcopy(base)
    add_lora_to_components(components, TrainConfig(lora_rank=4, lora_alpha=8, conv_rank=2, conv_alpha=1,
                                                   target_modules=ALL_TARGETS, train_text_encoder=True,
                                                   lora_type=lora_type, **cfg))
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


def peft_merged(components):
    """{kohya module: (W, peft's DoRA weight)}, the latter from peft's own merge (`LoraLayer.merge`)."""
    merged = copy.deepcopy(components)
    out = {}
    for prefix, model in named_models(merged):
        for name, layer in lora_layers(model).items():
            weight = layer.get_base_layer().weight.detach().clone()
            layer.merge(adapter_names=[ADAPTER])
            out[keymap.kohya_name(prefix, name)] = (weight, layer.get_base_layer().weight.detach().clone())
    return out


def lora_diff(sd, key, shape):
    """up @ down in the weight's shape, and alpha / rank: what every host computes first."""
    down, up = sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"]
    return (up.flatten(1) @ down.flatten(1)).reshape(shape), float(sd[f"{key}.alpha"]) / down.shape[0]


def rows(weight):
    """The norm of each output row, shaped to scale `weight`."""
    return weight.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))


# -- the hosts' formulas, restated --------------------------------------------------------------------

def lycoris(merged, dora_scale):
    """LyCORIS (lycoris/modules/locon.py `LoConModule.apply_weight_decompose`, wd_on_out=True, multiplier 1):
    the merged weight W + ΔW scaled by dora_scale over the norm of its output rows (plus eps)."""
    return merged * (dora_scale / (rows(merged) + EPS))


def comfyui(dora_scale, weight, diff, alpha, strength):
    """ComfyUI 0.8.0 `comfy/weight_adapter/base.py` `weight_decompose` (Forge dfdcbab6 `backend/patcher/lora.py`
    `weight_decompose` is the same): the axis from dora_scale.shape[0]; on the output axis the norm is of W itself."""
    calc = weight + alpha * diff
    if dora_scale.shape[0] == calc.shape[0]:
        norm = rows(weight)
    else:
        norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(calc.shape[1], *[1] * (calc.dim() - 1)).transpose(0, 1)
    calc = calc * (dora_scale / (norm + EPS))
    return weight + strength * (calc - weight)


def a1111(dora_scale, weight, diff, alpha, multiplier):
    """AUTOMATIC1111 1.10.1 `extensions-builtin/Lora/network.py`: `finalize_updown` scales up @ down by alpha / rank,
    `NetworkModule.apply_weight_decompose` normalises the input columns of W + ΔW (always), then the multiplier."""
    merged = weight + alpha * diff
    norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
    norm = norm.reshape(merged.shape[1], *[1] * (weight.dim() - 1)).transpose(0, 1)
    return weight + multiplier * (merged * (dora_scale / norm) - weight)


# -- config ------------------------------------------------------------------------------------------

def test_lora_type_is_lora_or_dora_and_dora_refuses_block_offload():
    assert TrainConfig().lora_type == "lora" and TrainConfig(lora_type="dora").lora_type == "dora"
    with pytest.raises(ConfigError, match="lora_type: 'loha' is not one of lora, dora"):
        TrainConfig(lora_type="loha")
    with pytest.raises(ConfigError, match="dora cannot use offload: blocks"):
        TrainConfig(lora_type="dora", offload="blocks")


def test_a_peft_without_dora_is_a_config_error_naming_the_version(tiny_sd1, monkeypatch):
    import peft

    monkeypatch.setattr(peft, "__version__", "0.9.0")
    with pytest.raises(ConfigError, match=r"needs peft >= 0\.10 \(this is peft 0\.9\.0\)"):
        add_lora_to_components(copy.deepcopy(tiny_sd1), TrainConfig(lora_type="dora"))


def test_memory_plan_never_offloads_a_dora_run():
    from lora_trainer.plan import _change_steps

    assert {"offload": "blocks"} in _change_steps(TrainConfig(), torch.device("cuda"))
    assert {"offload": "blocks"} not in _change_steps(TrainConfig(lora_type="dora"), torch.device("cuda"))


# -- the file ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_every_dora_layer_saves_its_magnitude_as_an_output_axis_fp32_dora_scale(family, request):
    components = with_lora(request.getfixturevalue(f"tiny_{family}"))
    sd = lora_state_dict(components, torch.float16)
    scales = [k for k in sd if k.endswith(".dora_scale")]
    assert len(scales) == sum(k.endswith(".lora_down.weight") for k in sd) > 0
    for prefix, model in named_models(components):
        for name, layer in lora_layers(model).items():
            weight = layer.get_base_layer().weight
            scale = sd[f"{keymap.kohya_name(prefix, name)}.dora_scale"]
            assert scale.dtype == torch.float32 and scale.shape == (weight.shape[0], *[1] * (weight.dim() - 1))
            assert torch.equal(scale.flatten(), dora_module(layer).weight.detach().flatten())


def test_each_hosts_formula_on_the_file_lycoris_is_peft_comfyui_off_by_the_norm_ratio_a1111_wrong(tiny_sd1):
    components = with_lora(tiny_sd1)
    sd = lora_state_dict(components, torch.float32)
    a1111_error = []
    for key, (weight, want) in peft_merged(components).items():
        scale = sd[f"{key}.dora_scale"]
        diff, alpha = lora_diff(sd, key, weight.shape)
        merged = weight + alpha * diff
        torch.testing.assert_close(lycoris(merged, scale), want, rtol=1e-5, atol=1e-6, msg=key)
        # ComfyUI/Forge divide by ‖W‖, not ‖W + ΔW‖: peft's weight with each row scaled by their ratio
        ratio = rows(merged) / (rows(weight) + EPS)
        torch.testing.assert_close(comfyui(scale, weight, diff, alpha, 1.0), want * ratio, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(comfyui(scale, weight, diff, alpha, 0.6), weight + 0.6 * (want * ratio - weight),
                                   rtol=1e-5, atol=1e-6)
        # merge --base and sampling: the LyCORIS weight at the hosts' strength
        torch.testing.assert_close(decomposed(weight, alpha * diff, scale, 0.6), weight + 0.6 * (want - weight),
                                   rtol=1e-5, atol=1e-6, msg=key)
        a1111_error.append(float((a1111(scale, weight, diff, alpha, 1.0) - want).norm() / want.norm()))
    assert min(a1111_error) > 0.01  # per input column: every layer comes out wrong, hence the tab's refusal


def test_comfyui_applies_the_file_with_its_own_code(tiny_sd1, tiny_sd1_file, tmp_path):
    """ComfyUI 0.8.0's key maps, loader and weight_decompose, run in a process of their own: every key of a DoRA and
    of a plain file loads, and the weights it makes are the restated formula's."""
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
        weights = peft_merged(components)  # (W, …) of every module
        assert set(applied) == set(weights)
        for key, (weight, _) in weights.items():
            diff, alpha = lora_diff(sd, key, weight.shape)
            want = comfyui(sd[f"{key}.dora_scale"], weight, diff, alpha, 0.7) if lora_type == "dora" else \
                weight + 0.7 * alpha * diff
            torch.testing.assert_close(applied[key].reshape(weight.shape), want, rtol=1e-5, atol=1e-6, msg=key)


def test_a1111_key_check_matches_every_dora_module(tiny_sd1, tiny_sd1_file, monkeypatch):
    """(ComfyUI's loader takes every key: test_comfyui_applies_the_file_with_its_own_code.)"""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    from lora_trainer_a1111.keycheck import module_names_from_state_dict, unmatched_keys

    keys = list(lora_state_dict(with_lora(tiny_sd1), torch.float32))
    assert any(k.endswith(".dora_scale") for k in keys)
    assert unmatched_keys(keys, module_names_from_state_dict(load_file(str(tiny_sd1_file)).keys())) == []


def test_the_a1111_tab_refuses_dora_and_forge_trains_it(monkeypatch, tmp_path, tiny_sd1_file, make_cfg):
    import webui_stubs

    from lora_trainer.callbacks import Callbacks

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    for forge in (False, True):
        webui_stubs.install(monkeypatch, tmp_path / str(forge), Path(tiny_sd1_file), types.SimpleNamespace(),
                            forge=forge)
        import lora_trainer.train as core
        from lora_trainer_a1111.host import A1111Backend

        monkeypatch.setattr(core, "train", lambda cfg, callbacks=None, host=None: "trained")
        cfg = make_cfg(lora_type="dora")
        if forge:
            assert A1111Backend().train(cfg, Callbacks()) == "trained"
        else:
            with pytest.raises(ConfigError, match="dora is not for AUTOMATIC1111.*Forge or ComfyUI"):
                A1111Backend().train(cfg, Callbacks())
            assert A1111Backend().train(make_cfg(), Callbacks()) == "trained"


def test_metadata_says_dora_the_way_lycoris_records_it():
    from lora_trainer.export import network_metadata

    components = types.SimpleNamespace(family="sd1", prediction_type="epsilon", name="base",
                                       resolved_hash=lambda: "0" * 64)
    meta = build_metadata(TrainConfig(lora_type="dora", conv_rank=2, conv_alpha=1), components, {})
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"]) == {"algo": "lora", "dora_wd": "True", "wd_on_output": "True",
                                                   "conv_dim": "2", "conv_alpha": "1.0"}
    plain = build_metadata(TrainConfig(), components, {})
    assert plain["ss_network_module"] == "networks.lora" and plain["ss_network_args"] == "{}"
    assert network_metadata(False, {"conv_dim": 2})["ss_network_args"] == '{"conv_dim": 2}'


# -- reading it back ---------------------------------------------------------------------------------

def test_init_lora_from_a_dora_file_is_the_trained_model_and_the_same_parameters(tiny_sd1, tmp_path):
    trained = with_lora(tiny_sd1)
    path = save_lora(tmp_path / "d.safetensors", lora_state_dict(trained, torch.float32), {})
    fresh = copy.deepcopy(tiny_sd1)
    unet_params, te_params = load_lora_file(fresh, path, trainable=True)
    torch.testing.assert_close(unet_output(fresh), unet_output(trained))
    started = copy.deepcopy(tiny_sd1)  # a new run's parameters, in the order the optimizer state follows
    want = add_lora_to_components(started, TrainConfig(lora_rank=4, lora_alpha=8, conv_rank=2, conv_alpha=1,
                                                       target_modules=ALL_TARGETS, train_text_encoder=True,
                                                       lora_type="dora"))
    assert [p.shape for p in unet_params + te_params] == [p.shape for p in want[0] + want[1]]
    assert all(p.requires_grad for p in unet_params + te_params)


def test_resume_continues_a_dora_run_exactly(make_cfg):
    from lora_trainer.callbacks import Callbacks
    from lora_trainer.errors import ResumeError
    from lora_trainer.model import build_tiny_components
    from lora_trainer.state import load_state
    from lora_trainer.train import train

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


def test_a_peft_dora_file_converts_to_the_same_kohya_file(tiny_sd1, tmp_path):
    from peft import get_peft_model_state_dict

    from lora_trainer.cli import main

    trained = with_lora(tiny_sd1)
    peft_sd = {f"unet.{k}": v for k, v in get_peft_model_state_dict(trained.unet).items()}
    assert any(k.endswith("conv1.lora_magnitude_vector") and v.dim() == 4 for k, v in peft_sd.items())
    ours = {k: v for k, v in lora_state_dict(trained, torch.float32).items() if k.startswith("lora_unet")}
    kohya = to_kohya(peft_sd, "sd1", 1, default_alpha=8)
    conv = {k for k in ours if "conv" in k}  # conv_alpha differs from lora_alpha; peft's file does not say
    assert set(kohya) == set(ours)
    for key in set(ours) - {k for k in conv if k.endswith(".alpha")}:
        torch.testing.assert_close(kohya[key].float(), ours[key], msg=key)
    save_file(peft_sd, str(tmp_path / "peft.safetensors"))
    assert main(["convert", "--input", str(tmp_path / "peft.safetensors"), "--output",
                 str(tmp_path / "kohya.safetensors"), "--alpha", "8"]) == 0
    tensors, meta = read_lora(tmp_path / "kohya.safetensors")
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"])["dora_wd"] == "True"
    assert sum(k.endswith(".dora_scale") for k in tensors) == sum(k.endswith(".lora_down.weight") for k in tensors)


def test_an_input_axis_dora_file_is_refused_for_training_with_the_reason(tiny_sd1):
    sd = lora_state_dict(with_lora(tiny_sd1), torch.float32)
    key = next(k for k in sd if k.endswith("attn1_to_q.dora_scale"))
    sd[key] = sd[key].reshape(1, -1)  # old LyCORIS (wd_on_output=False): one magnitude per input column
    with pytest.raises(ModelError, match="scales input channels.*peft's DoRA"):
        load_lora_file_from(tiny_sd1, sd)
    sd.pop(key)
    with pytest.raises(ModelError, match="mixes DoRA and plain LoRA layers"):
        load_lora_file_from(tiny_sd1, sd)


def load_lora_file_from(base, sd):
    from lora_trainer.lora import load_lora_into

    return load_lora_into(copy.deepcopy(base), sd)


# -- sampling, fp8 -----------------------------------------------------------------------------------

def test_sample_strengths_are_the_hosts_interpolation(tiny_sd1):
    trained = with_lora(tiny_sd1)
    models = [trained.unet, *trained.text_encoders]
    base, full = unet_output(tiny_sd1), unet_output(trained)
    set_lora_scale(models, 0.0)
    torch.testing.assert_close(unet_output(trained), base)  # strength 0 is the base model, magnitudes and all
    layer = next(x for x in lora_layers(trained.unet).values() if isinstance(x.get_base_layer(), torch.nn.Linear))
    x = torch.randn(2, layer.in_features)
    set_lora_scale(models, 1.0)
    at_one = layer(x)
    set_lora_scale(models, 0.5)
    plain = layer.get_base_layer()(x)
    torch.testing.assert_close(layer(x), plain + 0.5 * (at_one - plain))  # W + S·(W' − W), as the hosts merge
    set_lora_scale(models, 1.0)
    torch.testing.assert_close(unet_output(trained), full)


@pytest.mark.parametrize("storage", [torch.float8_e4m3fn, torch.bfloat16], ids=["fp8", "bf16"])
def test_dora_on_stored_base_weights_starts_as_the_base_and_trains(tiny_sd1, storage):
    """base_precision fp8 (or bf16 on the CPU): weights stored in another dtype than the one computed in."""
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
        assert torch.equal(dora_module(layer).weight.detach().flatten(), weight.flatten(1).norm(dim=1))
    torch.testing.assert_close(unet_output(components), before)
    conv = next(x for x in layers.values() if isinstance(x.get_base_layer(), torch.nn.Conv2d))
    conv.train()  # dropout on: peft's DoRA conv then convolves with the base weight itself
    conv(torch.randn(1, conv.get_base_layer().in_channels, 4, 4)).square().mean().backward()
    assert dora_module(conv).weight.grad.abs().sum() > 0 and conv.lora_B[ADAPTER].weight.grad.abs().sum() > 0


# -- merge and resize --------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_merge_into_a_checkpoint_bakes_in_peft_dora_weight_at_the_strength(family, request, tmp_path):
    from lora_trainer.merge import merge_into_checkpoint
    from lora_trainer.model import load_components

    base = request.getfixturevalue(f"tiny_{family}")
    trained = with_lora(base)
    path = save_lora(tmp_path / "d.safetensors", lora_state_dict(trained, torch.float32), {})
    out = merge_into_checkpoint(request.getfixturevalue(f"tiny_{family}_file"), [(path, 0.7)],
                                tmp_path / "m.safetensors")
    expected = copy.deepcopy(base)
    merged = peft_merged(trained)
    for prefix, model in named_models(expected):
        modules = dict(model.named_modules())
        for key, name in keymap.reverse_table(prefix, list(modules)).items():
            if key in merged:
                weight, want = merged[key]
                modules[name].weight.data = weight + 0.7 * (want - weight)
    for (_, want), (_, got) in zip(named_models(expected), named_models(load_components(out))):
        got_sd = got.state_dict()
        for k, v in want.state_dict().items():
            torch.testing.assert_close(got_sd[k], v, rtol=1e-5, atol=1e-5, msg=k)


def test_merging_dora_without_a_base_is_refused_and_resize_keeps_the_magnitudes(tiny_sd1, tmp_path):
    from lora_trainer.resize import merge_lora_files, resize_lora_file

    path = save_lora(tmp_path / "d.safetensors", lora_state_dict(with_lora(tiny_sd1), torch.float32), {})
    with pytest.raises(ModelError, match="d.safetensors is a DoRA file.*checkpoint \\(--base\\)"):
        merge_lora_files([(path, 1.0)], tmp_path / "merged.safetensors")
    same, _ = resize_lora_file(path, tmp_path / "r.safetensors", rank=4, precision="fp32")
    tensors, meta = read_lora(same)
    assert meta["ss_network_module"] == "lycoris.kohya"
    original, resized = copy.deepcopy(tiny_sd1), copy.deepcopy(tiny_sd1)
    load_lora_file(original, path)
    load_lora_file(resized, same)  # the full rank: the same direction update, the same magnitudes
    torch.testing.assert_close(unet_output(resized), unet_output(original), rtol=1e-4, atol=1e-5)
