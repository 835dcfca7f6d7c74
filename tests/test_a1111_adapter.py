"""The A1111/Forge adapter against stand-in `modules.*` objects: form → config, model freed and restored,
progress and Interrupt through shared.state, the LoRA in --lora-dir with its card, refresh, the key check."""

from __future__ import annotations

import copy
import json
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


class FakeState:
    def __init__(self):
        self.interrupted = False
        self.stopping_generation = False
        self.job_count = 0
        self.sampling_step = self.sampling_steps = 0
        self.textinfo = ""
        self.begun = self.ended = 0

    def begin(self, job=""):
        self.begun += 1

    def end(self):
        self.ended += 1


@pytest.fixture
def webui(monkeypatch, tmp_path, tiny_sd1_file):
    """Stand-in `modules` package (shared, sd_models, devices, paths) and extensions-builtin/Lora's `networks`."""
    from safetensors.torch import load_file

    calls = []
    weights = load_file(str(tiny_sd1_file))
    sd_model = types.SimpleNamespace(sd_checkpoint_info=types.SimpleNamespace(filename=str(tiny_sd1_file)),
                                     state_dict=lambda: weights, is_sd2=False)
    shared = types.SimpleNamespace(cmd_opts=types.SimpleNamespace(lora_dir=str(tmp_path / "Lora"), api_auth=None),
                                   state=FakeState(), sd_model=sd_model, opts=types.SimpleNamespace())
    sd_models = types.SimpleNamespace(send_model_to_cpu=lambda m: calls.append(("cpu", m)),
                                      send_model_to_device=lambda m: calls.append(("gpu", m)))
    devices = types.SimpleNamespace(torch_gc=lambda: None)
    paths = types.SimpleNamespace(models_path=str(tmp_path / "models"), data_path=str(tmp_path))
    networks = types.SimpleNamespace(list_available_networks=lambda: calls.append(("refresh",)))
    pkg = types.ModuleType("modules")
    for name, mod in dict(shared=shared, sd_models=sd_models, devices=devices, paths=paths).items():
        setattr(pkg, name, mod)
        monkeypatch.setitem(sys.modules, f"modules.{name}", mod)
    monkeypatch.setitem(sys.modules, "modules", pkg)
    monkeypatch.setitem(sys.modules, "networks", networks)
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    return types.SimpleNamespace(shared=shared, calls=calls, lora_dir=tmp_path / "Lora", sd_model=sd_model)


def test_form_maps_to_config(webui, demo_folder, tmp_path):
    from lora_trainer_a1111.host import A1111Backend

    from lora_trainer.ui import form_to_config

    backend = A1111Backend()
    assert backend.default_base_model() == webui.sd_model.sd_checkpoint_info.filename
    cfg = form_to_config("my style", str(demo_folder), backend.default_base_model(), "inkwash", "character", True,
                         {"lora_rank": 16, "epochs": 3, "target_modules": "to_q, to_v"}, backend.output_root())
    assert cfg.output_name == "my style" and cfg.trigger_word == "inkwash"
    assert cfg.lora_rank == 32  # the preset's; 16 is the field default, so the form did not change it
    assert cfg.epochs == 3 and cfg.target_modules == ["to_q", "to_v"]
    assert cfg.gradient_checkpointing and cfg.gradient_accumulation_steps == 4  # low VRAM
    assert Path(cfg.output_dir) == tmp_path / "outputs" / "lora_trainer" / "my style"


def test_train_publishes_into_lora_dir_with_card(webui, make_cfg, tiny_sd1):
    from lora_trainer_a1111.host import A1111Backend, A1111Callbacks

    from lora_trainer.train import train
    from lora_trainer.ui.session import SessionCallbacks

    backend = A1111Backend()
    cfg = make_cfg(max_train_steps=2, trigger_word="inkwash", base_model=str(webui.sd_model.sd_checkpoint_info.filename))
    cb = SessionCallbacks(A1111Callbacks())
    result = train(cfg, callbacks=cb, host=backend.host(), components=copy.deepcopy(tiny_sd1))
    assert webui.calls[0][0] == "cpu" and ("gpu", webui.sd_model) in webui.calls  # freed, then restored
    assert webui.calls.index(("gpu", webui.sd_model)) > webui.calls.index(("refresh",))
    assert result.lora_path.parent == webui.lora_dir and result.lora_path.name == "lora.safetensors"
    assert webui.shared.state.sampling_steps == 2 and webui.shared.state.sampling_step == 2

    session = types.SimpleNamespace(callbacks=cb)
    problem = backend.after_training(cfg, result, session)
    assert problem == ""  # every key matches A1111's naming of the tiny model's modules
    card = json.loads(result.lora_path.with_suffix(".json").read_text())
    assert card["activation text"] == "inkwash" and card["preferred weight"] == 0.8 and card["sd version"] == "SD1"
    assert result.lora_path.with_suffix(".preview.png").is_file()  # the card's picture
    assert webui.calls.count(("refresh",)) == 2  # by the core after publishing, and after the card


def test_interrupt_stops_within_a_step_and_restores(webui, make_cfg, tiny_sd1):
    from lora_trainer_a1111.host import A1111Callbacks, A1111Host

    from lora_trainer.train import train

    webui.shared.state.interrupted = True
    result = train(make_cfg(max_train_steps=5), callbacks=A1111Callbacks(), host=A1111Host(),
                   components=copy.deepcopy(tiny_sd1))
    assert result.stopped and result.steps <= 1 and result.state_dir is not None
    assert webui.calls[-1] == ("gpu", webui.sd_model)
    assert not webui.lora_dir.exists() or not list(webui.lora_dir.glob("*.safetensors"))


def test_lora_dir_default_and_forge_free(webui, monkeypatch, tmp_path):
    from lora_trainer_a1111.host import A1111Host

    webui.shared.cmd_opts.lora_dir = None
    assert A1111Host().lora_dir() == tmp_path / "models" / "Lora"
    # Forge has no send_model_to_cpu: its memory manager unloads instead; nothing to restore by hand.
    forge = types.SimpleNamespace(unload_all_models=lambda: webui.calls.append(("unload",)))
    backend_pkg = types.ModuleType("backend")
    backend_pkg.memory_management = forge
    monkeypatch.setitem(sys.modules, "backend", backend_pkg)
    monkeypatch.setitem(sys.modules, "backend.memory_management", forge)
    monkeypatch.setitem(sys.modules, "modules.sd_models", types.SimpleNamespace())
    sys.modules["modules"].sd_models = sys.modules["modules.sd_models"]
    host = A1111Host()
    host.free_gpu()
    host.restore_gpu()
    assert webui.calls == [("unload",)]


def test_key_check_flags_a_peft_format_file(webui, tmp_path):
    import torch
    from lora_trainer_a1111.host import check_against_host
    from lora_trainer_a1111.keycheck import module_names_from_state_dict, to_compvis
    from safetensors.torch import save_file

    assert to_compvis("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q") == \
        "diffusion_model_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert to_compvis("lora_unet_up_blocks_1_resnets_2_conv1") == "diffusion_model_output_blocks_5_0_in_layers_2"
    peft = tmp_path / "peft.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 8)},
              str(peft))
    known = module_names_from_state_dict(webui.sd_model.state_dict().keys())
    message = check_against_host(peft, known)
    assert message.startswith("Error:") and "1 layer" in message


@pytest.mark.parametrize("bad", ["../evil", "a/b", "..", "", "x\\y", "/abs", "name."])
def test_lora_name_cannot_escape(bad):
    from lora_trainer.errors import ConfigError
    from lora_trainer.ui import safe_lora_name

    with pytest.raises(ConfigError):
        safe_lora_name(bad)
    assert safe_lora_name("my lora-v1.2") == "my lora-v1.2"


def test_key_check_sdxl_and_sd2_text_encoders():
    from lora_trainer_a1111.keycheck import to_compvis, unmatched_keys

    known = {"1_model_transformer_resblocks_0_attn", "1_model_transformer_resblocks_0_mlp_c_fc",
             "0_transformer_text_model_encoder_layers_0_self_attn_q_proj"}
    keys = ["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha",
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"]
    assert unmatched_keys(keys, known) == []
    assert to_compvis("lora_te_text_model_encoder_layers_3_mlp_fc2", is_sd2=True) == \
        "model_transformer_resblocks_3_mlp_c_proj"
    assert unmatched_keys(["lora_te_text_model_encoder_layers_3_mlp_fc2.alpha"],
                          {"model_transformer_resblocks_3_mlp_c_proj"}) == []
