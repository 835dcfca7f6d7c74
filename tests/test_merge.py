"""`merge` and `resize`: LoRAs baked into a checkpoint in its own layout, merged into one LoRA, resized by SVD."""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from test_export import ALL_TARGETS, trained_like

from lora_trainer.adapters import keymap
from lora_trainer.errors import ConfigError, ModelError
from lora_trainer.adapters.export import lora_state_dict, read_lora, save_lora
from lora_trainer.adapters.keymap import named_models
from lora_trainer.adapters.merge import merge_into_checkpoint, module_map, parse_lora_arg


def lora_file(family, path, metadata=None, **cfg):
    """A LoRA file on every layer kind (LoCon convs and text encoders too), random up weights."""
    trained = trained_like(family, target_modules=ALL_TARGETS, train_text_encoder=True, **cfg)
    return save_lora(path, lora_state_dict(trained, torch.float32), metadata or {})


def other_lora(path, out):
    """A second, different LoRA on the same modules: up weights reversed, alpha doubled."""
    tensors, _ = read_lora(path)
    return save_lora(out, {k: v.flip(0) if "lora_up" in k else v * 2 if k.endswith(".alpha") else v
                           for k, v in tensors.items()}, {})


def fused_by_hand(components, loras):
    """A copy of `components` with W += s · alpha/rank · up @ down applied to its diffusers modules."""
    fused = copy.deepcopy(components)
    for path, strength in loras:
        kohya, _ = read_lora(path)
        for prefix, model in named_models(fused):
            table = keymap.reverse_table(prefix, [n for n, _ in model.named_modules()])
            modules = dict(model.named_modules())
            for key in {k.rsplit(".", 2)[0] for k in kohya if k.endswith(".lora_down.weight")}:
                if key not in table:
                    continue
                down, up = kohya[f"{key}.lora_down.weight"], kohya[f"{key}.lora_up.weight"]
                weight = modules[table[key]].weight
                scale = strength * float(kohya[f"{key}.alpha"]) / down.shape[0]
                with torch.no_grad():
                    weight += scale * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
    return fused


def tensors_of(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.fixture(scope="module")
def tiny_files(tiny_sd1, tiny_sd2, tiny_sdxl, tmp_path_factory):
    from ldm_layout import save_ldm_file

    folder = tmp_path_factory.mktemp("merge_bases")
    return {f: save_ldm_file(c, folder / f"{f}.safetensors") for f, c in
            (("sd1", tiny_sd1), ("sd2", tiny_sd2), ("sdxl", tiny_sdxl))}


def test_sd1_rule_by_hand_on_the_base_keys(tiny_files, tmp_path):
    lora = lora_file("sd1", tmp_path / "a.safetensors")
    out = merge_into_checkpoint(tiny_files["sd1"], [(lora, 0.7)], tmp_path / "merged.safetensors")
    base, base_meta = tensors_of(tiny_files["sd1"])
    merged, meta = tensors_of(out)
    assert list(merged) == list(base)
    kohya, _ = read_lora(lora)
    where = module_map(list(base), "sd1", _configs("sd1"))
    touched = set()
    for module in {k.rsplit(".", 2)[0] for k in kohya if k.endswith(".lora_down.weight")}:
        key, part = where[module]
        assert part is None
        down, up = kohya[f"{module}.lora_down.weight"], kohya[f"{module}.lora_up.weight"]
        scale = 0.7 * float(kohya[f"{module}.alpha"]) / down.shape[0]
        expected = base[key] + scale * (up.flatten(1) @ down.flatten(1)).reshape(base[key].shape)
        torch.testing.assert_close(merged[key], expected, rtol=1e-5, atol=1e-6)
        touched.add(key)
    assert any("input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight" in k for k in touched)
    assert any(k.startswith("cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj")
               for k in touched)
    assert any(".in_layers.2.weight" in k for k in touched)  # a LoCon 3x3 conv
    for key in set(base) - touched:
        assert torch.equal(merged[key], base[key]) and merged[key].dtype == base[key].dtype, key
    record = json.loads(meta["lora_trainer.merged_loras"])
    assert record[0]["strength"] == 0.7 and len(record[0]["sshs_model_hash"]) == 64


def _configs(family):
    from lora_trainer.model.shipped import load_configs

    return load_configs(family, "tiny")


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_merged_file_loads_as_the_base_with_the_lora_fused(family, request, tiny_files, tmp_path):
    from lora_trainer.model import load_components

    components = request.getfixturevalue(f"tiny_{family}")
    a = lora_file(family, tmp_path / "a.safetensors")
    b = other_lora(a, tmp_path / "b.safetensors")
    out = merge_into_checkpoint(tiny_files[family], [(a, 0.8), (b, -0.5)], tmp_path / "m.safetensors")
    loaded = load_components(out)
    expected = fused_by_hand(components, [(a, 0.8), (b, -0.5)])
    for (_, want), (_, got) in zip(named_models(expected), named_models(loaded)):
        want_sd, got_sd = want.state_dict(), got.state_dict()
        assert set(want_sd) == set(got_sd)
        for k in want_sd:
            torch.testing.assert_close(got_sd[k], want_sd[k], rtol=1e-5, atol=1e-5, msg=k)
    changed = [k for k, v in loaded.unet.state_dict().items() if not torch.equal(v, components.unet.state_dict()[k])]
    assert changed
    if family != "sd1":  # q/k/v LoRAs landed in the fused OpenCLIP in_proj weight
        def q_proj(te):
            return next(m.weight for n, m in te.named_modules() if n.endswith("layers.0.self_attn.q_proj"))

        assert not torch.equal(q_proj(loaded.text_encoders[-1]), q_proj(components.text_encoders[-1]))


def test_sd1_matches_diffusers_fuse_lora(tiny_sd1, tiny_files, tmp_path):
    from diffusers.utils import USE_PEFT_BACKEND
    from test_export import pipeline_for

    from lora_trainer.model import load_components

    if not USE_PEFT_BACKEND:
        pytest.skip("diffusers' load_lora_weights needs its peft backend")
    trained = trained_like("sd1", target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "ff", "proj"])
    path = save_lora(tmp_path / "x.safetensors", lora_state_dict(trained, torch.float32), {})
    out = merge_into_checkpoint(tiny_files["sd1"], [(path, 0.6)], tmp_path / "m.safetensors")
    pipe = pipeline_for(copy.deepcopy(tiny_sd1))
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    pipe.fuse_lora(lora_scale=0.6)
    pipe.unload_lora_weights()
    got = load_components(out).unet.state_dict()
    for k, v in pipe.unet.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-5, msg=k)


def test_precision_and_never_overwrite(tiny_files, tmp_path):
    lora = lora_file("sd1", tmp_path / "a.safetensors")
    out = merge_into_checkpoint(tiny_files["sd1"], [(lora, 1.0)], tmp_path / "m.safetensors", precision="fp16")
    merged, _ = tensors_of(out)
    assert {v.dtype for v in merged.values() if v.is_floating_point()} == {torch.float16}
    with pytest.raises(ConfigError, match="never overwritten"):
        merge_into_checkpoint(tiny_files["sd1"], [(lora, 1.0)], out)


def test_lora_of_another_family_is_one_line(tiny_files, tmp_path):
    lora = lora_file("sdxl", tmp_path / "xl.safetensors", {"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(ModelError, match="SDXL LoRA and sd1.safetensors is an SD 1.x checkpoint") as err:
        merge_into_checkpoint(tiny_files["sd1"], [(lora, 1.0)], tmp_path / "m.safetensors")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "m.safetensors").exists()


def test_modules_matching_nothing_are_listed_and_nothing_is_written(tiny_files, tmp_path):
    tensors, _ = read_lora(lora_file("sd1", tmp_path / "a.safetensors"))
    tensors.update({"lora_unet_nowhere_to_q.lora_down.weight": torch.zeros(4, 8),
                    "lora_unet_nowhere_to_q.lora_up.weight": torch.zeros(8, 4),
                    "lora_unet_nowhere_to_q.alpha": torch.tensor(4.0)})
    bad = save_lora(tmp_path / "bad.safetensors", tensors, {})
    with pytest.raises(ModelError, match="lora_unet_nowhere_to_q"):
        merge_into_checkpoint(tiny_files["sd1"], [(bad, 1.0)], tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_lora_argument_parsing():
    assert parse_lora_arg("a.safetensors:0.5") == (parse_lora_arg("a.safetensors")[0], 0.5)
    assert parse_lora_arg("a.safetensors")[1] == 1.0
    assert str(parse_lora_arg(r"C:\x\a.safetensors")[0]) == r"C:\x\a.safetensors"


# -- LoRAs into one LoRA, and resize ---------------------------------------------------------------

def update_of(path, module):
    """The update a host applies for one module of a saved LoRA file (read back through read_lora)."""
    kohya, _ = read_lora(path)
    down, up = kohya[f"{module}.lora_down.weight"], kohya[f"{module}.lora_up.weight"]
    return float(kohya[f"{module}.alpha"]) / down.shape[0] * (up.flatten(1) @ down.flatten(1))


def test_stacked_merge_loads_as_both_loras_fused(tiny_sd1, tmp_path):
    from test_export import unet_output

    from lora_trainer.adapters.export import load_lora_file
    from lora_trainer.adapters.resize import merge_lora_files

    a = lora_file("sd1", tmp_path / "a.safetensors")
    b = other_lora(a, tmp_path / "b.safetensors")
    out, table = merge_lora_files([(a, 0.8), (b, -0.5)], tmp_path / "ab.safetensors", precision="fp32")
    assert {r.fraction for r in table} == {1.0}
    _, meta = read_lora(out, with_tensors=False)
    assert meta["ss_network_module"] == "networks.lora" and len(json.loads(meta["lora_trainer.merged_loras"])) == 2
    wrapped = copy.deepcopy(tiny_sd1)
    load_lora_file(wrapped, out)
    torch.testing.assert_close(unet_output(wrapped), unet_output(fused_by_hand(tiny_sd1, [(a, 0.8), (b, -0.5)])),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.once  # the same on every stack: the newest runs it
def test_svd_merge_keeps_the_best_rank_r_update(tmp_path):
    from lora_trainer.adapters.resize import merge_lora_files

    a = lora_file("sd1", tmp_path / "a.safetensors")
    b = other_lora(a, tmp_path / "b.safetensors")
    exact, _ = merge_lora_files([(a, 1.0), (b, 1.0)], tmp_path / "exact.safetensors", precision="fp32")
    low, table = merge_lora_files([(a, 1.0), (b, 1.0)], tmp_path / "r3.safetensors", rank=3, precision="fp32")
    for row in table:
        want, got = update_of(exact, row.module), update_of(low, row.module)
        s = torch.linalg.svdvals(want.double())
        tail = float(s[row.new_rank:].norm())
        assert row.new_rank == min(3, int(s.numel()))
        assert abs(float((want - got).norm()) - tail) <= 1e-4 * float(s.norm()) + 1e-6, row.module
        assert row.fraction == pytest.approx(float(s[:row.new_rank].norm() / s.norm()), rel=1e-5)


@pytest.mark.once  # the same on every stack: the newest runs it
def test_resize_error_bounds_and_alpha_keeps_the_scale(tiny_sd1, tmp_path):
    from test_export import unet_output

    from lora_trainer.adapters.export import load_lora_file
    from lora_trainer.adapters.resize import resize_lora_file

    a = lora_file("sd1", tmp_path / "a.safetensors")
    same, _ = resize_lora_file(a, tmp_path / "r4.safetensors", rank=4, precision="fp32")
    original, resized = copy.deepcopy(tiny_sd1), copy.deepcopy(tiny_sd1)
    load_lora_file(original, a)
    load_lora_file(resized, same)  # the project's read path gives the same update at the full rank
    torch.testing.assert_close(unet_output(resized), unet_output(original), rtol=1e-4, atol=1e-5)

    low, table = resize_lora_file(a, tmp_path / "r2.safetensors", rank=2, precision="fp32")
    kohya, _ = read_lora(low)
    for row in table:
        want, got = update_of(a, row.module), update_of(low, row.module)
        s = torch.linalg.svdvals(want.double())
        assert row.new_rank == min(2, row.old_rank)
        assert abs(float((want - got).norm()) - float(s[row.new_rank:].norm())) <= 1e-4 * float(s.norm()) + 1e-6
        old_alpha = float(read_lora(a)[0][f"{row.module}.alpha"])
        assert float(kohya[f"{row.module}.alpha"]) == pytest.approx(old_alpha * row.new_rank / row.old_rank)

    dyn, table = resize_lora_file(a, tmp_path / "dyn.safetensors", fro=0.9, precision="fp32")
    for row in table:
        s = torch.linalg.svdvals(update_of(a, row.module).double())
        share = ((s ** 2).cumsum(0) / (s ** 2).sum()).sqrt()
        assert row.fraction >= 0.9 - 1e-9
        assert row.new_rank == 1 or float(share[row.new_rank - 2]) < 0.9


def test_cli_merge_and_resize(tiny_files, tmp_path, capsys):
    from lora_trainer.cli.commands import main

    a = lora_file("sd1", tmp_path / "a.safetensors")
    out = tmp_path / "m.safetensors"
    assert main(["merge", "--base", str(tiny_files["sd1"]), "--lora", f"{a}:0.5", "--output", str(out)]) == 0
    assert f"checkpoint: {out}" in capsys.readouterr().out
    assert main(["merge", "--base", str(tiny_files["sd1"]), "--lora", str(a), "--output", str(out)]) == 2
    assert "never overwritten" in capsys.readouterr().err
    assert main(["merge", "--lora", str(a), "--lora", f"{a}:-1", "--rank", "2",
                 "--output", str(tmp_path / "one.safetensors")]) == 0
    assert "kept (Frobenius)" in capsys.readouterr().out
    assert main(["resize", "--input", str(a), "--dynamic", "sv_fro:0.9", "--output", str(tmp_path / "d.safetensors")]) == 0
    printed = capsys.readouterr().out
    assert "old rank" in printed and "LoRA:" in printed
    assert main(["resize", "--input", str(a), "--dynamic", "fro:2", "--output", str(tmp_path / "e.safetensors")]) == 2


def test_peft_named_lora_merges_like_its_kohya_twin(tiny_files, tmp_path):
    from peft import get_peft_model_state_dict

    trained = trained_like("sd1", target_modules=["q_proj", "v_proj"])
    peft_sd = {f"unet.{k}": v.contiguous() for k, v in get_peft_model_state_dict(trained.unet).items()}
    peft = save_lora(tmp_path / "adapter_model.safetensors", peft_sd, {})
    (tmp_path / "adapter_config.json").write_text(json.dumps({"lora_alpha": 8}))
    kohya = save_lora(tmp_path / "k" / "k.safetensors", lora_state_dict(trained, torch.float32), {})
    one = merge_into_checkpoint(tiny_files["sd1"], [(peft, 1.0)], tmp_path / "p.safetensors")
    two = merge_into_checkpoint(tiny_files["sd1"], [(kohya, 1.0)], tmp_path / "q.safetensors")
    got, want = tensors_of(one)[0], tensors_of(two)[0]
    for k in want:
        torch.testing.assert_close(got[k], want[k])


def test_peft_named_sdxl_lora_on_sd1_is_one_line(tiny_files, tmp_path):
    name = "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"
    lora = save_lora(tmp_path / "xl.safetensors", {f"{name}.lora_A.weight": torch.zeros(2, 32),
                                                   f"{name}.lora_B.weight": torch.zeros(32, 2)}, {})
    with pytest.raises(ModelError, match="xl.safetensors is an SDXL LoRA and sd1.safetensors is an SD 1.x"):
        merge_into_checkpoint(tiny_files["sd1"], [(lora, 1.0)], tmp_path / "m.safetensors")
    sd1 = lora_file("sd1", tmp_path / "a.safetensors", {"ss_base_model_version": "sd_v1"})
    with pytest.raises(ModelError, match="a.safetensors is an SD 1.x LoRA and sdxl.safetensors is an SDXL"):
        merge_into_checkpoint(tiny_files["sdxl"], [(sd1, 1.0)], tmp_path / "m.safetensors")
