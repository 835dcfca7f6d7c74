"""The tab's logic without gradio: presets and form → config, the loss plot, one run at a time, Interrupt."""

from __future__ import annotations

import threading

import pytest


def test_presets_then_user_changes(demo_folder, tmp_path):
    from lora_trainer.ui import LOW_VRAM, PRESETS, form_to_config

    cfg = form_to_config("a", str(demo_folder), "m.safetensors", "tw", "object", False, {}, tmp_path)
    assert cfg.lora_alpha == PRESETS["object"]["lora_alpha"] and not cfg.gradient_checkpointing
    cfg = form_to_config("a", str(demo_folder), "m.safetensors", "tw", "object", True,
                         {"lora_alpha": 4.0, "sample_strengths": "0, 1"}, tmp_path)
    assert cfg.lora_alpha == 4.0 and cfg.sample_strengths == [0.0, 1.0]
    assert all(getattr(cfg, k) == v for k, v in LOW_VRAM.items())


def test_the_form_shows_the_preset_and_a_value_set_back_to_the_plain_default_wins(demo_folder, tmp_path):
    from lora_trainer.config import field_help
    from lora_trainer.ui import PRESETS, form_to_config, preset_values

    shown = preset_values("style", False)
    assert shown["lora_alpha"] == PRESETS["style"]["lora_alpha"] != field_help()["lora_alpha"]["default"]
    assert preset_values("style", True)["gradient_checkpointing"] is True
    cfg = form_to_config("a", str(demo_folder), "m.safetensors", "", "style", False, shown, tmp_path)
    assert cfg.lora_alpha == PRESETS["style"]["lora_alpha"] and cfg.flip_aug is True  # the form as shown
    # The user types 32 (the config's default) over the preset's 16: 32 is what they get.
    cfg = form_to_config("a", str(demo_folder), "m.safetensors", "", "style", False,
                         {**shown, "lora_alpha": 32.0, "flip_aug": False}, tmp_path)
    assert cfg.lora_alpha == 32.0 and cfg.flip_aug is False


def test_form_errors_are_user_messages(demo_folder, tmp_path):
    from lora_trainer.errors import ConfigError
    from lora_trainer.ui import form_to_config

    with pytest.raises(ConfigError, match="image folder"):
        form_to_config("a", " ", "", "", "style", False, {}, tmp_path)
    with pytest.raises(ConfigError, match="Unknown config key 'lora_ran'. Did you mean 'lora_rank'"):
        form_to_config("a", str(demo_folder), "", "", "style", False, {"lora_ran": 3}, tmp_path)


def test_loss_image_draws_raw_and_smoothed_loss_on_real_axes():
    from lora_trainer.loss_plot import RAW, SMOOTH, loss_image, smoothed

    assert loss_image([], 480, 220).size == (480, 220)
    assert smoothed([2.0]) == [2.0]  # debiased: the first value is not pulled towards 0
    assert smoothed([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])
    img = loss_image([1.04, 1.04, 0.7, float("nan"), 0.5], 480, 220)
    colors = {c for _, c in img.getcolors(maxcolors=1 << 20)}

    def near(hex_color):
        rgb = tuple(int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
        return any(sum(abs(a - b) for a, b in zip(c, rgb)) < 12 for c in colors)

    assert near(RAW) and near(SMOOTH)  # both lines are drawn
    assert len(colors) > 50  # anti-aliased text and lines: a real font, not a bitmap one


def test_loss_axis_labels_differ_on_a_flat_short_run():
    from lora_trainer.loss_plot import loss_figure

    fig = loss_figure([1.04, 1.0402, 1.0401], 512, 256)  # the old drawing wrote "1.04" at both ends
    fig.canvas.draw()
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels() if t.get_text()]
    assert len(labels) >= 3 and len(set(labels)) == len(labels)


def test_session_runs_once_and_stops():
    from lora_trainer.errors import LoraTrainerError
    from lora_trainer.ui import TrainSession

    started = threading.Event()

    def run(cb):
        started.set()
        while not cb.should_stop():
            cb.on_loss(1, 0.5, 1e-4)
            started.wait(0.01)
        return None

    s = TrainSession(run).start()
    started.wait(5)
    with pytest.raises(LoraTrainerError, match="already going"):
        TrainSession(run).start()
    s.stop()
    s.wait(5)
    assert not s.running and s.callbacks.losses and s.error is None


def test_the_tab_plans_memory_on_a_gpu_and_shows_the_plan(monkeypatch):
    import torch

    from lora_trainer.ui import preset_values
    from lora_trainer.ui.session import TrainSession

    assert preset_values("style", False)["memory_budget_gb"] == "0"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert preset_values("style", True)["memory_budget_gb"] == "auto"
    session = TrainSession(lambda callbacks: callbacks.on_status("memory plan on cuda: predicted peak 3.1 GB"))
    session.callbacks.on_status("memory plan on cuda: predicted peak 3.1 GB, budget 7.5 GB; no change needed")
    session.callbacks.on_status("caching latents 1/4")
    assert session.summary() == "caching latents 1/4"  # not started: its status
    session.thread.is_alive = lambda: True  # as while it runs
    assert session.summary().splitlines() == ["memory plan on cuda: predicted peak 3.1 GB, budget 7.5 GB; no change "
                                              "needed", "step 0/0 — caching latents 1/4"]
