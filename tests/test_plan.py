"""The memory plan: counted from shapes, changes in the promised order, budgets applied, out-of-memory back-off.

Whether the predictions match measured peaks is bench/memory.py's job (real architectures); here the
tiny models check the behaviour.
"""

from __future__ import annotations

import json

import pytest
import torch

import lora_trainer.training.loop as train_mod
from lora_trainer.cli.commands import main
from lora_trainer.errors import ConfigError, TrainingError
from lora_trainer.adapters.export import read_lora
from lora_trainer.training.plan import plan_memory
from lora_trainer.training.loop import train

GB = 1 << 30


def test_plan_counts_what_the_settings_change(make_cfg, tiny_sd1_file):
    def plan(**kw):
        return plan_memory(make_cfg(base_model=str(tiny_sd1_file), **kw), "cpu")

    base = plan()
    assert base.device == "cpu" and base.budget_bytes is None and base.fits and base.changes == []
    assert plan(resolution=128).parts["activations"] > 2 * base.parts["activations"]
    assert plan(gradient_checkpointing=True).parts["activations"] < base.parts["activations"]
    assert plan(batch_size=4).parts["activations"] > plan(batch_size=1).parts["activations"]
    fp8 = plan(base_precision="fp8").parts["base weights (UNet)"]
    assert fp8 < 0.4 * base.parts["base weights (UNet)"]  # 1 byte instead of 4 for every layer weight
    assert plan(lora_rank=32).parts["LoRA + optimizer"] == 8 * plan(lora_rank=4).parts["LoRA + optimizer"]


ORDER = [{"gradient_checkpointing": True}, {"base_precision": "fp8"}, {"offload": "blocks"},
         {"batch_size": 2, "gradient_accumulation_steps": 2}, {"batch_size": 1, "gradient_accumulation_steps": 4}]


def test_budget_takes_the_cheapest_changes_first(make_cfg, tiny_sd1_file):
    """Planned for a CUDA device (no GPU is needed to plan for one): checkpointing, fp8, offload, then smaller
    batches with the same effective batch; resolution never. Only as many changes as the budget needs."""
    cfg = make_cfg(base_model=str(tiny_sd1_file), batch_size=4, resolution=256)
    peak = plan_memory(cfg, "cuda").peak_bytes
    smallest = plan_memory(cfg.replace(gradient_checkpointing=True, base_precision="fp8", offload="blocks",
                                       batch_size=1, gradient_accumulation_steps=4), "cuda").peak_bytes
    assert smallest < peak
    for budget in (peak - 1, (peak + smallest) // 2, smallest):
        plan = plan_memory(cfg, "cuda", budget / GB)
        steps = [c["set"] for c in plan.changes]
        assert steps and steps == ORDER[:len(steps)]
        assert plan.fits and plan.final_peak <= budget
        assert all(a["peak_bytes"] >= b["peak_bytes"] for a, b in zip(plan.changes, plan.changes[1:]))
    assert plan_memory(cfg, "cuda", peak / GB).changes == []
    with pytest.raises(ConfigError, match=r"budget of 0.00 GB: the smallest reachable peak is [\d.]+ GB"):
        plan_memory(cfg, "cuda", 0.001)


def test_plan_command_prints_json(make_cfg, tiny_sd1_file, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"base_model: {tiny_sd1_file}\nresolution: 64\n", encoding="utf-8")
    assert main(["plan", "--config", str(config), "--device", "cpu", "--budget-gb", "1000", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["device"] == "cpu" and out["fits"] is True and out["changes"] == []
    assert out["budget_bytes"] == 1000 * GB and 0 < out["peak_bytes"] < out["budget_bytes"]
    assert main(["plan", "--config", str(config), "--device", "cpu", "--budget-gb", "0.001"]) == 2
    assert "smallest reachable peak" in capsys.readouterr().err


def test_train_applies_the_plan_and_says_so(make_cfg, tiny_sd1_file):
    cfg = make_cfg(base_model=str(tiny_sd1_file), max_train_steps=1)
    budget = (plan_memory(cfg, "cpu").peak_bytes - 1) / GB
    said = []

    class Listen(train_mod.Callbacks):
        def on_status(self, message):
            said.append(message)

    result = train(cfg.replace(memory_budget_gb=str(budget)), Listen())
    _, meta = read_lora(result.lora_path)
    assert meta["ss_gradient_checkpointing"] == "True"
    assert any(s.startswith("memory plan on cpu") and "changed gradient_checkpointing: True" in s for s in said)


def _oom_once_at(monkeypatch, step: int) -> None:
    """CUDA's out-of-memory error, once, in the first micro-batch of optimizer step `step`."""
    real = train_mod._micro_step
    raised = []

    def micro_step(run, *args):
        if run.position.step + 1 == step and not raised:
            raised.append(step)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(run, *args)

    monkeypatch.setattr(train_mod, "_micro_step", micro_step)


def test_out_of_memory_steps_down_and_continues_exactly(make_cfg, tiny_sd1_file, monkeypatch, tmp_path):
    cfg = make_cfg(base_model=str(tiny_sd1_file), max_train_steps=3, gradient_accumulation_steps=2)
    clean = train(cfg.replace(output_dir=str(tmp_path / "clean")))
    _oom_once_at(monkeypatch, 2)
    said = []

    class Listen(train_mod.Callbacks):
        def on_status(self, message):
            said.append(message)

    backed = train(cfg.replace(output_dir=str(tmp_path / "oom")), Listen())
    assert backed.steps == 3 and not backed.stopped
    assert any("out of GPU memory at step 2: continuing with gradient_checkpointing: True" in s for s in said)
    want, _ = read_lora(clean.lora_path)
    got, meta = read_lora(backed.lora_path)
    assert json.loads(meta["lora_trainer.memory_changes"]) == [{"gradient_checkpointing": True}]
    assert meta["ss_gradient_checkpointing"] == "True"  # the settings really used
    for key in want:  # the redone step is the step a clean run takes: checkpointing does not change the math
        assert torch.allclose(got[key].float(), want[key].float(), atol=1e-3), key


def test_out_of_memory_gives_up_after_the_step_downs(make_cfg, tiny_sd1_file, monkeypatch):
    def always(run, *args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(train_mod, "_micro_step", always)
    with pytest.raises(TrainingError, match="Out of GPU memory at step 1 even after gradient_checkpointing: True; "
                                            "base_precision: fp8"):
        train(make_cfg(base_model=str(tiny_sd1_file), max_train_steps=2))


def test_auto_budget_for_a_gpu_this_machine_lacks_says_what_to_give(make_cfg, tiny_sd1_file):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: auto reads its free VRAM")  # the CPU-only CI runs it
    with pytest.raises(ConfigError, match="give the budget in GB"):
        plan_memory(make_cfg(base_model=str(tiny_sd1_file)), "cuda", "auto")
