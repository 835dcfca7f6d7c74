"""The YAML contract: seed keys as written, overrides, and errors that say what to fix."""

import importlib.util
from pathlib import Path

import pytest

from lora_trainer.config import TrainConfig, config_from_dict, field_help, load_config
from lora_trainer.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_seed_yaml_keys_load_as_written():
    cfg = load_config(str(ROOT / "configs" / "sd15_style.yaml"))
    assert cfg.train_data_dir == "./data/sci_lab_train"
    assert cfg.metadata_path == "./data/sci_lab_train/metadata.csv"
    assert cfg.lora_rank == 16 and cfg.lora_alpha == 32.0
    assert cfg.target_modules == ["q_proj", "v_proj"]
    assert cfg.batch_size == 4 and cfg.epochs == 15 and cfg.save_steps == 100
    assert cfg.learning_rate == pytest.approx(2e-4)  # YAML reads `2e-4` as a string: coerced
    assert cfg.name == "sci_lab_lora"


@pytest.mark.parametrize("name", ["sd15_style.yaml", "sdxl_character.yaml", "low_vram.yaml",
                                  "sdxl_prodigy_loraplus.yaml"])
def test_every_example_config_is_valid(name):
    assert isinstance(load_config(str(ROOT / "configs" / name)), TrainConfig)


def test_set_overrides_are_yaml_parsed():
    cfg = load_config(str(ROOT / "configs" / "sd15_style.yaml"), ["lora_rank=8", "epochs=3", "flip_aug=false",
                                                                  "target_modules=[q_proj, k_proj]"])
    assert (cfg.lora_rank, cfg.epochs, cfg.flip_aug) == (8, 3, False)
    assert cfg.target_modules == ["q_proj", "k_proj"]


def test_unknown_key_names_the_nearest_valid_one():
    with pytest.raises(ConfigError, match="Unknown config key 'lora_rnak'.*'lora_rank'"):
        config_from_dict({"lora_rnak": 8})


def test_wrong_type_names_field_and_expectation():
    with pytest.raises(ConfigError, match="batch_size: expected a whole number"):
        config_from_dict({"batch_size": "four"})
    with pytest.raises(ConfigError, match="flip_aug: expected true or false"):
        config_from_dict({"flip_aug": "sometimes"})


def test_out_of_range_and_choices():
    with pytest.raises(ConfigError, match="lora_rank must be at least 1"):
        config_from_dict({"lora_rank": 0})
    with pytest.raises(ConfigError, match="mixed_precision: 'fp8' is not one of"):
        config_from_dict({"mixed_precision": "fp8"})
    with pytest.raises(ConfigError, match="lora_dropout must be in"):
        config_from_dict({"lora_dropout": 1.5})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora_rank: [1,\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="--set expects key=value"):
        load_config(None, ["lora_rank"])


def test_every_field_has_help_and_group():
    info = field_help()
    assert "lora_rank" in info and info["lora_rank"]["default"] == 16
    for name, meta in info.items():
        assert meta["help"], name
        assert meta["group"] in {"data", "model", "lora", "training", "output"}, name


def _config_doc_generator():
    spec = importlib.util.spec_from_file_location("make_config", ROOT / "docs" / "make_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_doc_documents_every_config_key():
    doc = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    missing = [name for name in field_help() if f"| `{name}` |" not in doc]
    assert not missing, f"docs/config.md lacks these keys (run python docs/make_config.py): {missing}"


def test_config_doc_is_generated_from_the_config():
    doc = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert doc == _config_doc_generator().render(), "docs/config.md is stale: run python docs/make_config.py"
