"""The command line as a user types it: demo, train with --set, sample, convert, init_lora."""

import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from lora_trainer.cli.commands import main


def test_demo_trains_a_lora_and_renders_a_grid(tmp_path, capsys):
    assert main(["demo", "--output", str(tmp_path / "demo"), "--steps", "4"]) == 0
    lora = tmp_path / "demo" / "demo_lora.safetensors"
    with safe_open(str(lora), "pt") as f:
        assert f.metadata()["ss_output_name"] == "demo_lora"
        assert any(k.endswith(".lora_down.weight") for k in f.keys())
    grids = list((tmp_path / "demo" / "samples").glob("*.png"))
    assert grids and Image.open(grids[0]).width == 3 * 64  # strengths 0, 0.5, 1
    assert "LoRA:" in capsys.readouterr().out


def test_a_second_demo_run_keeps_every_file_of_the_first(tmp_path, capsys):
    first = tmp_path / "demo"
    assert main(["demo", "--output", str(first), "--steps", "2"]) == 0
    before = {p: p.read_bytes() for p in first.rglob("*") if p.is_file()}
    stamps = {p: p.stat().st_mtime_ns for p in before}
    assert any(p.parent.name == "state" or p.parent.parent.name == "state" for p in before)
    capsys.readouterr()
    assert main(["demo", "--output", str(first), "--steps", "2"]) == 0
    said = capsys.readouterr().out
    second = tmp_path / "demo-v2"
    assert f"this run writes into {second}" in said and f"LoRA: {second / 'demo_lora.safetensors'}" in said
    assert {p: p.read_bytes() for p in first.rglob("*") if p.is_file()} == before
    assert {p: p.stat().st_mtime_ns for p in before} == stamps
    assert list((second / "samples").glob("*.png")) and (second / "data" / "metadata.csv").is_file()


def test_train_from_yaml_with_set_overrides(tiny_sd1_file, demo_folder, tmp_path, capfd):
    config = tmp_path / "my.yaml"
    config.write_text(
        f"train_data_dir: {demo_folder}\nmetadata_path: {demo_folder / 'metadata.csv'}\n"
        f"base_model: {tiny_sd1_file}\nlora_rank: 16\nlora_alpha: 32\ntarget_modules: [q_proj, v_proj]\n"
        f"batch_size: 4\nepochs: 15\nlearning_rate: 2e-4\noutput_dir: {tmp_path / 'out' / 'sci_lab_lora'}\n"
        "save_steps: 100\nresolution: 64\nmin_bucket_reso: 64\ndevice: cpu\n", encoding="utf-8")
    assert main(["train", "--config", str(config), "--set", "lora_rank=8", "--set", "epochs=1"]) == 0
    lora = tmp_path / "out" / "sci_lab_lora" / "sci_lab_lora.safetensors"
    with safe_open(str(lora), "pt") as f:
        meta = f.metadata()
        key = next(k for k in f.keys() if k.endswith("attn1_to_q.lora_down.weight"))
        assert f.get_tensor(key).shape[0] == 8
        assert not any("to_k" in k for k in f.keys())  # only q_proj and v_proj were asked for
    assert meta["ss_steps"] == "2" and meta["ss_sd_model_name"] == "tiny-sd1"
    out = capfd.readouterr()
    assert (out.out + out.err).count("sci_lab_lora.safetensors") == 1  # the finished file is named once
    assert out.out.strip().splitlines()[-1] == f"LoRA: {lora}"


def test_config_error_is_one_line_not_a_traceback(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("lora_rnak: 8\n", encoding="utf-8")
    assert main(["train", "--config", str(config)]) == 2
    assert capsys.readouterr().err.strip() == "error: Unknown config key 'lora_rnak'. Did you mean 'lora_rank'?"


def test_sample_renders_a_labelled_strength_grid(tiny_sd1_file, make_cfg, tmp_path):
    from lora_trainer.model import build_tiny_components
    from lora_trainer.training.loop import train

    result = train(make_cfg(max_train_steps=2), components=build_tiny_components("sd1", seed=0))
    out = tmp_path / "grid.png"
    assert main(["sample", "--base-model", str(tiny_sd1_file), "--lora", str(result.lora_path), "--prompt",
                 "cyberpunk lab", "--strengths", "0.5,0.6,0.7,0.8", "--seed", "1", "--steps", "2",
                 "--output", str(out)]) == 0
    grid = Image.open(out)
    assert grid.width == 4 * 64 and grid.height > 64


def test_convert_peft_file_to_kohya(tmp_path):
    from safetensors.torch import save_file

    peft = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(4, 32),
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(32, 4)}
    save_file(peft, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"lora_alpha": 8, "r": 4}), encoding="utf-8")
    assert main(["convert", "--input", str(tmp_path / "adapter_model.safetensors"),
                 "--output", str(tmp_path / "x.safetensors")]) == 0
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
        assert float(f.get_tensor(f"{name}.alpha")) == 8.0
        assert f.metadata()["ss_base_model_version"] == "sd_v1"


KOHYA_NAME = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def kohya_file(path, dtype=torch.float16):
    """A one-layer LoRA in the kohya layout, as A1111/ComfyUI users have them."""
    from safetensors.torch import save_file

    tensors = {f"{KOHYA_NAME}.lora_down.weight": torch.randn(4, 32, dtype=dtype),
               f"{KOHYA_NAME}.lora_up.weight": torch.randn(32, 4, dtype=dtype), f"{KOHYA_NAME}.alpha": torch.tensor(4.0)}
    save_file(tensors, str(path), {"ss_network_dim": "4"})
    return tensors


def test_convert_of_a_kohya_file_says_so_and_keeps_its_precision(tmp_path, capsys):
    name = KOHYA_NAME
    kohya = kohya_file(tmp_path / "in.safetensors")
    assert main(["convert", "--input", str(tmp_path / "in.safetensors"), "--output", str(tmp_path / "a.safetensors")]) == 0
    said = capsys.readouterr().out
    assert "in.safetensors is already in the kohya layout" in said and "fp16" in said
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        assert f.get_tensor(f"{name}.lora_down.weight").dtype == torch.float16
        torch.testing.assert_close(f.get_tensor(f"{name}.lora_up.weight"), kohya[f"{name}.lora_up.weight"])
    assert (tmp_path / "a.safetensors").stat().st_size <= (tmp_path / "in.safetensors").stat().st_size + 512
    assert main(["convert", "--input", str(tmp_path / "in.safetensors"), "--output", str(tmp_path / "b.safetensors"),
                 "--save-precision", "fp32"]) == 0
    with safe_open(str(tmp_path / "b.safetensors"), "pt") as f:
        assert f.get_tensor(f"{name}.lora_down.weight").dtype == torch.float32


@pytest.mark.parametrize("spelling", ["ours", "peft"])
def test_init_lora_continues_from_an_existing_lora(spelling, make_cfg, tmp_path):
    """The seeds' case: add a few new images to an existing LoRA and keep training it."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from lora_trainer.adapters.export import read_lora
    from lora_trainer.model import build_tiny_components
    from lora_trainer.training.loop import train

    first = train(make_cfg(max_train_steps=3, output_dir=str(tmp_path / "a")), components=build_tiny_components("sd1"))
    start = first.lora_path
    if spelling == "peft":  # the same weights as a peft/diffusers file: unet.… lora_A/lora_B, no alpha
        from lora_trainer.adapters.export import to_kohya
        from lora_trainer.adapters.lora import load_lora_into

        comps = build_tiny_components("sd1")
        load_lora_into(comps, to_kohya(read_lora(start)[0], "sd1", 1))
        start = tmp_path / "peft.safetensors"
        save_file({f"unet.{k}": v for k, v in get_peft_model_state_dict(comps.unet).items()}, str(start))
    cfg = make_cfg(max_train_steps=2, output_dir=str(tmp_path / "b"), init_lora=str(start), learning_rate=1e-9)
    second = train(cfg, components=build_tiny_components("sd1"))
    a, _ = read_lora(first.lora_path)
    b, _ = read_lora(second.lora_path)
    assert set(a) == set(b)
    for k in a:  # a tiny learning rate: the continued LoRA is the one it started from
        torch.testing.assert_close(a[k], b[k], atol=2e-3, rtol=0)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_up" in k)


def test_ui_without_gradio_is_one_line_that_says_how(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    assert main(["ui"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: The standalone UI needs gradio") and "-m pip install gradio" in err
    assert "\n" not in err and "Traceback" not in err


def error_of(args, capsys):
    """The one error line a command prints (exit status 2)."""
    assert main(args) == 2
    said = capsys.readouterr()
    assert "Traceback" not in said.err
    return said.err.strip()


def test_plan_names_a_missing_base_model_file(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"base_model: {tmp_path / 'models' / 'sd15.safetensors'}\n", encoding="utf-8")
    err = error_of(["plan", "--config", str(config)], capsys)
    assert f"Base model not found: {tmp_path / 'models' / 'sd15.safetensors'}" in err and "family" not in err


def test_doctor_on_a_missing_folder_names_the_folder_not_a_config_key(tmp_path, capsys):
    err = error_of(["doctor", str(tmp_path / "my images")], capsys)
    assert err == f"error: Image folder not found: {tmp_path / 'my images'}. Give the folder that holds your " \
                  "training images."


def test_doctor_on_an_empty_folder_prints_no_empty_progress_bar(tmp_path, capfd):
    (tmp_path / "empty").mkdir()
    assert main(["doctor", str(tmp_path / "empty")]) == 1
    said = capfd.readouterr()
    assert "no_images" in said.out or "no image" in said.out.lower()
    assert "image/s" not in said.err and "0image" not in said.err and "it/s" not in said.err, said.err


def test_train_without_a_config_asks_for_one(capsys):
    err = error_of(["train"], capsys)
    assert "--config" in err and "train_data_dir" not in err


def test_score_checks_the_lora_and_base_model_before_the_captioner_weights(tmp_path, capsys, tiny_sd1_file,
                                                                          demo_folder):
    common = ["score", "--prompt", "a house", "--reference-dir", str(demo_folder), "--clip-weights",
              str(tmp_path / "absent_coca.safetensors")]
    err = error_of(common + ["--lora", str(tmp_path / "style.safetensors"), "--base-model", str(tiny_sd1_file)], capsys)
    assert f"LoRA file not found: {tmp_path / 'style.safetensors'}" in err
    kohya_file(tmp_path / "style.safetensors")
    err = error_of(common + ["--lora", str(tmp_path / "style.safetensors"), "--base-model",
                             str(tmp_path / "sd15.safetensors")], capsys)
    assert f"Base model not found: {tmp_path / 'sd15.safetensors'}" in err
    err = error_of(common + ["--lora", str(tmp_path / "style.safetensors"), "--base-model", str(tiny_sd1_file)], capsys)
    assert "absent_coca.safetensors" in err  # with both present, the weights come next


def test_merge_with_a_lora_as_base_says_it_is_a_lora(tmp_path, capsys):
    kohya_file(tmp_path / "style.safetensors")
    err = error_of(["merge", "--base", str(tmp_path / "style.safetensors"), "--lora", str(tmp_path / "style.safetensors"),
                    "--output", str(tmp_path / "merged.safetensors")], capsys)
    assert "is a LoRA" in err and "not a base model" in err and "cannot be trained" not in err
    assert not (tmp_path / "merged.safetensors").exists()
