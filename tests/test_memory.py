"""Memory behaviour: nothing outlives a run, checkpoints are read tensor by tensor, base weights in fp8/half.

What a run costs in bytes is measured by bench/ (train_step.py, base_precision.py), never here.
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from ldm_layout import components_to_ldm, save_ldm_file

import lora_trainer.model as model_stage
from lora_trainer.errors import ModelError, TrainingError
from lora_trainer.adapters.export import read_lora
from lora_trainer.model.checkpoint_file import CheckpointFile
from lora_trainer.model.loader import HandedOver
from lora_trainer.model.precision import _StoredLinear, store_base_weights
from lora_trainer.training.loop import train


def _parameters() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.nn.Parameter))


def test_three_runs_leave_no_model_alive(make_cfg, tiny_sd1_file, monkeypatch, tmp_path):
    """Finished, failed (error kept by the caller, as a UI does) and finished again: every module each run loaded
    is gone once train() returns, and no parameter is left anywhere."""
    loaded = []
    real = model_stage.load_components

    def spy(*args, **kwargs):
        components = real(*args, **kwargs)
        loaded.append([weakref.ref(m) for m in components.models()] + [weakref.ref(components)])
        return components

    monkeypatch.setattr(model_stage, "load_components", spy)
    gc.collect()
    before = _parameters()
    kept_errors = []
    for i, overrides in enumerate([{}, {"learning_rate": 1e30}, {"sample_prompts": ["a house"]}]):
        cfg = make_cfg(base_model=str(tiny_sd1_file), max_train_steps=2, output_dir=str(tmp_path / f"run{i}"),
                       **overrides)
        try:
            train(cfg)
        except TrainingError as err:  # the NaN run
            kept_errors.append(err)
        assert all(ref() is None for ref in loaded[i]), f"run {i} left its models alive"
    assert len(kept_errors) == 1 and len(loaded) == 3
    gc.collect()
    assert _parameters() == before


def test_passed_in_models_go_back_to_the_cpu_for_the_caller(make_cfg, tiny_sd1):
    comps = copy.deepcopy(tiny_sd1)
    train(make_cfg(max_train_steps=1), components=comps)
    for module in comps.models():
        assert {p.device.type for p in module.parameters()} == {"cpu"}


def test_checkpoint_file_reads_what_safetensors_reads(tiny_sd1, tmp_path):
    from safetensors.torch import load_file

    path = save_ldm_file(tiny_sd1, tmp_path / "m.safetensors", dtype=torch.float16)
    want = load_file(str(path))
    lazy = CheckpointFile(path)
    assert set(lazy) == set(want) and len(lazy) == len(want)
    key = next(k for k in want if want[k].dim() == 4)
    assert lazy.shape(key) == tuple(want[key].shape)
    assert torch.equal(lazy[key], want[key]) and lazy[key].dtype == torch.float16
    lazy.cast_to = torch.float32
    got = lazy.pop(key)
    assert got.dtype == torch.float32 and torch.equal(got, want[key].float()) and key not in lazy
    lazy.rename(lambda k: "x." + k)
    other = next(iter(want))
    assert torch.equal(lazy["x." + other].half(), want[other])


def test_damaged_checkpoint_names_the_fix(tiny_sd1, tmp_path):
    path = save_ldm_file(tiny_sd1, tmp_path / "m.safetensors")
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="damaged or cut off.*Download the file again"):
        CheckpointFile(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(ModelError, match="damaged or incomplete"):
        CheckpointFile(junk)


def test_file_is_read_once_tensor_by_tensor_in_the_training_dtype(tiny_sd1, tmp_path, monkeypatch):
    path = save_ldm_file(tiny_sd1, tmp_path / "m.safetensors", dtype=torch.float16)
    reads = []
    real = CheckpointFile.__getitem__
    monkeypatch.setattr(CheckpointFile, "__getitem__", lambda self, key: reads.append(key) or real(self, key))
    loaded = model_stage.load_components(path, dtype=torch.bfloat16, vae_dtype=torch.float32)
    used = [k for k in reads if k != "model.diffusion_model.input_blocks.0.0.weight"]  # its shape picks the variant
    assert len(used) == len(set(used))  # no tensor read twice
    assert {p.dtype for p in loaded.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in loaded.vae.parameters()} == {torch.float32}


def test_handed_over_weights_become_the_training_copy(tiny_sd1):
    sd = HandedOver(components_to_ldm(tiny_sd1))
    pointers = {t.data_ptr() for t in sd.values()}
    loaded = model_stage.load_components(sd)
    assert len(sd) == 0  # consumed
    shared = [p for p in loaded.unet.parameters() if p.data_ptr() in pointers]
    assert len(shared) > len(list(loaded.unet.parameters())) // 2  # not copied
    host = components_to_ldm(tiny_sd1)
    model_stage.load_components(host)
    assert len(host) == len(components_to_ldm(tiny_sd1))  # a host's own dict is left alone


@pytest.mark.parametrize("storage", [torch.float8_e4m3fn, torch.bfloat16])
def test_stored_layers_compute_like_their_rounded_weights(storage):
    """Forward and input gradients equal those of the same layers with the rounded weights in fp32."""
    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Flatten(),
                                 torch.nn.Linear(8 * 6 * 6, 5))
    layers.requires_grad_(False)
    reference = copy.deepcopy(layers)
    for p in reference.parameters():
        if p.dim() > 1:
            p.data = p.data.to(storage).float()
    assert store_base_weights([layers], storage, torch.float32) == 2
    assert layers[0].weight.dtype == storage and layers[3].bias.dtype == torch.float32
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, want = layers(x), reference(x_ref)
    assert _StoredLinear.__name__ in out.grad_fn.name()  # went through the stored-weight path
    assert torch.allclose(out, want, atol=1e-5)
    out.square().sum().backward()
    want.square().sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)


def test_fp8_base_trains_and_exports_the_same_keys(make_cfg, tiny_sd1_file, tmp_path):
    fp32 = train(make_cfg(base_model=str(tiny_sd1_file), max_train_steps=2, output_dir=str(tmp_path / "a")))
    fp8 = train(make_cfg(base_model=str(tiny_sd1_file), max_train_steps=2, output_dir=str(tmp_path / "b"),
                         base_precision="fp8", sample_prompts=["a house"]))  # sampling computes from fp8 too
    want, _ = read_lora(fp32.lora_path)
    got, meta = read_lora(fp8.lora_path)
    assert set(got) == set(want)  # the same kohya keys the hosts load with no dropped key (tests/test_export.py)
    assert meta["lora_trainer.base_precision"] == "float8_e4m3fn"
    assert all(torch.isfinite(t.float()).all() for t in got.values())
    assert any(not torch.equal(got[k].float(), want[k].float()) for k in got if "lora_up" in k)  # it trained


def test_fp8_is_quantized_part_by_part_as_it_loads(tiny_sd1_file):
    loaded = model_stage.load_components(tiny_sd1_file, dtype=torch.bfloat16, vae_dtype=torch.float32,
                                         matrix_dtype=torch.float8_e4m3fn)
    unet, te = loaded.unet, loaded.text_encoders[0]
    assert unet.conv_in.weight.dtype == torch.float8_e4m3fn and unet.conv_in.bias.dtype == torch.bfloat16
    assert unet.conv_norm_out.weight.dtype == torch.bfloat16 and loaded.vae.encoder.conv_in.weight.dtype == torch.float32
    named = dict(te.named_modules())  # transformers 4 and 5 name the levels differently
    assert next(m for n, m in named.items() if n.endswith("q_proj")).weight.dtype == torch.float8_e4m3fn
    token = next(m for n, m in named.items() if n.endswith("token_embedding"))
    assert token.weight.dtype == torch.bfloat16  # an embedding, not a matrix


def test_lora_on_a_quantized_base_starts_in_fp32_not_rounded(tiny_sd1):
    from lora_trainer.adapters.lora import ADAPTER, add_lora, lora_layers

    unet = copy.deepcopy(tiny_sd1.unet)
    store_base_weights([unet], torch.float8_e4m3fn, torch.float32)
    add_lora(unet, ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"], 4, 4)
    a = next(iter(lora_layers(unet).values())).lora_A[ADAPTER].weight
    assert a.dtype == torch.float32 and a.requires_grad
    assert not torch.equal(a, a.to(torch.float8_e4m3fn).float())  # a real fp32 init, not fp8 values
