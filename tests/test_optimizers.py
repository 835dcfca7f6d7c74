"""The optimizers (Prodigy, Adafactor, CAME, Lion, schedule-free AdamW beside AdamW), optimizer_args and LoRA+.

Each optional package is installed in CI (requirements-dev.txt), never by install.py into a host.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lora_trainer.callbacks import Callbacks
from lora_trainer.errors import ConfigError
from lora_trainer.training import optimizers
from lora_trainer.training.loop import train

# what each needs beside the tiny model's defaults (their authors' learning rates)
SETTINGS = {
    "prodigy": dict(learning_rate=1.0),
    "adafactor": {},
    "came": dict(learning_rate=1e-4),
    "lion": dict(learning_rate=3e-5),
    "adamw_schedulefree": dict(learning_rate=1e-3),
}


class StopAt(Callbacks):
    def __init__(self, at):
        self.at, self.step = at, 0

    def on_loss(self, step, loss, lr):
        self.step = step

    def should_stop(self):
        return self.step >= self.at


def _cfg(make_cfg, base, name, **changes):
    values = dict(base_model=str(base), optimizer=name, max_train_steps=3, save_steps=1, **SETTINGS[name])
    return make_cfg(**{**values, **changes})


@pytest.mark.parametrize("name", list(SETTINGS))
def test_each_optimizer_trains_the_lora_and_resumes_bit_for_bit(name, make_cfg, tiny_sd1_file, tmp_path):
    straight = train(_cfg(make_cfg, tiny_sd1_file, name, output_dir=str(tmp_path / "straight")))
    ups = {k: v for k, v in load_file(str(straight.lora_path)).items() if "lora_up" in k}
    assert ups and max(float(v.abs().max()) for v in ups.values()) > 0  # peft starts the ups at zero
    stopped = train(_cfg(make_cfg, tiny_sd1_file, name, output_dir=str(tmp_path / "r")), StopAt(1))
    assert stopped.stopped and stopped.steps == 1
    resumed = train(_cfg(make_cfg, tiny_sd1_file, name, output_dir=str(tmp_path / "r")), resume=str(tmp_path / "r"))
    a, b = load_file(str(straight.lora_path)), load_file(str(resumed.lora_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("name", ["prodigy", "came", "lion", "adamw_schedulefree"])
def test_an_optimizer_whose_package_is_missing_is_one_line_with_the_pip_command(name, make_cfg, tiny_sd1_file,
                                                                                monkeypatch):
    module = optimizers.OPTIMIZERS[name].where.split(":")[0]
    real = optimizers.importlib.import_module

    def without(what, *args):
        if what == module:
            raise ImportError(f"No module named {module!r}")
        return real(what, *args)

    monkeypatch.setattr(optimizers.importlib, "import_module", without)
    package = optimizers.OPTIMIZERS[name].package
    with pytest.raises(ConfigError, match=rf"needs the {package} package, which is not installed: "
                                          rf"python -m pip install {package}, or use optimizer: adamw"):
        train(_cfg(make_cfg, tiny_sd1_file, name))


def test_optimizer_args_are_checked_against_the_optimizer_s_signature(make_cfg, tiny_sd1_file):
    cfg = make_cfg(base_model=str(tiny_sd1_file), optimizer="prodigy", learning_rate=1.0, optimizer_args="d_coef=0.5, decouple=true")
    assert cfg.optimizer_args == {"d_coef": 0.5, "decouple": True}
    group = optimizers.make_optimizer(cfg, [torch.nn.Parameter(torch.zeros(2))], [], torch.device("cpu")).param_groups[0]
    assert group["d_coef"] == 0.5
    bad = cfg.replace(optimizer_args={"d_coeff": 0.5})
    with pytest.raises(ConfigError) as err:
        optimizers.make_optimizer(bad, [torch.nn.Parameter(torch.zeros(2))], [], torch.device("cpu"))
    said = str(err.value)
    assert said.startswith("optimizer_args d_coeff: not an argument of prodigy") and "d_coef" in said
    assert "\n" not in said
    with pytest.raises(ConfigError, match="expected key=value pairs"):
        make_cfg(optimizer_args="d_coef")


def test_the_schedules_the_authors_document_are_required(make_cfg):
    with pytest.raises(ConfigError, match="prodigy estimates the step size itself.*learning_rate: 1.0"):
        make_cfg(optimizer="prodigy", learning_rate=1e-4)
    with pytest.raises(ConfigError, match="lr_scheduler linear with optimizer prodigy: its authors use constant or"):
        make_cfg(optimizer="prodigy", learning_rate=1.0, lr_scheduler="linear")
    assert make_cfg(optimizer="prodigy", learning_rate=1.0, lr_scheduler="cosine").lr_scheduler == "cosine"
    with pytest.raises(ConfigError, match="Adafactor with relative_step follows its own schedule"):
        make_cfg(optimizer="adafactor", lr_scheduler="cosine")
    assert make_cfg(optimizer="adafactor", lr_scheduler="cosine", optimizer_args={"relative_step": False,
                                                                              "scale_parameter": False})
    with pytest.raises(ConfigError, match="schedule-free AdamW replaces the schedule"):
        make_cfg(optimizer="adamw_schedulefree", lr_scheduler="cosine")


def test_the_effective_learning_rate_is_logged_prodigy_s_d_times_lr(make_cfg, tiny_sd1_file):
    result = train(_cfg(make_cfg, tiny_sd1_file, "prodigy", max_train_steps=2, save_steps=0))
    events = [json.loads(line) for line in (result.output_dir / "logs" / "train.jsonl").read_text().splitlines()]
    rates = [e["lr"] for e in events if e.get("event") == "loss"]
    assert len(rates) == 2 and all(0 < r < 1e-2 for r in rates)  # d starts at 1e-6: not the nominal 1.0


def test_loraplus_puts_only_the_up_matrices_at_the_ratio(make_cfg, tiny_sd1):
    from lora_trainer.adapters.lora import ADAPTER, add_lora_to_components, lora_layers
    from lora_trainer.training.setup import up_weights

    import copy

    comps = copy.deepcopy(tiny_sd1)
    cfg = make_cfg(loraplus_lr_ratio=16, learning_rate=1e-4, train_text_encoder=True, text_encoder_lr=5e-5)
    unet, te = add_lora_to_components(comps, cfg)
    groups = optimizers.make_optimizer(cfg, unet, te, torch.device("cpu"), up_weights(comps)).param_groups
    ups = {id(layer.lora_B[ADAPTER].weight) for m in comps.models() for layer in lora_layers(m).values()}
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in groups}
    assert sorted(by_lr) == [5e-5, 1e-4, 5e-5 * 16, 1e-4 * 16]
    assert by_lr[1e-4 * 16] | by_lr[5e-5 * 16] == ups  # every up at the ratio, and nothing else
    assert not (by_lr[1e-4] | by_lr[5e-5]) & ups
    assert by_lr[1e-4 * 16] <= {id(p) for p in unet} and by_lr[5e-5 * 16] <= {id(p) for p in te}
