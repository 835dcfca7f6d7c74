"""The tab's logic without gradio: presets and form → config, the loss plot, one run at a time, Interrupt, messages
in the tab's words, the final status (skipped images named; after the LoRA is saved, warnings, never an error)."""

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
    from lora_trainer.evaluate.loss_plot import RAW, SMOOTH, loss_image, smoothed

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
    from lora_trainer.evaluate.loss_plot import loss_figure

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


def test_messages_name_the_tabs_fields_not_config_keys_or_cli_flags():
    from lora_trainer.config import TrainConfig
    from lora_trainer.data.dataset import scan_images
    from lora_trainer.errors import DatasetError
    from lora_trainer.ui.session import in_tab_words

    with pytest.raises(DatasetError) as e:
        scan_images(TrainConfig(train_data_dir="/no/such"))
    assert str(e.value).startswith("train_data_dir not found")  # the CLI keeps the config key
    assert in_tab_words(str(e.value)).startswith("Image folder not found: /no/such. Point it at the folder")
    assert in_tab_words("output_name 'x/y' is not a file name; trigger_word is empty; base_model is empty") == \
        "LoRA name 'x/y' is not a file name; Trigger word is empty; Base model is empty"
    assert in_tab_words("ss_base_model_version and lora_rank stay") == "ss_base_model_version and lora_rank stay"
    assert in_tab_words("Captioner weights file not found: /w.bin. Check the --pretrained path.") == \
        'Captioner weights file not found: /w.bin. Check the path in "Captioner weights".'
    assert "--" not in in_tab_words("w.bin does not fit the coca_ViT-L-14 model (x). "
                                    "Choose the --model these weights belong to.")


def test_a_run_error_is_shown_in_the_tabs_words():
    from lora_trainer.errors import DatasetError
    from lora_trainer.ui import TrainSession

    def run(cb):
        raise DatasetError("train_data_dir not found: /x. Point it at the folder that holds your training images.")

    session = TrainSession(run).start()
    session.wait(5)
    assert session.summary() == "Error: Image folder not found: /x. Point it at the folder that holds your training images."


def test_done_names_the_skipped_images():
    import types

    from lora_trainer.ui import TrainSession

    result = types.SimpleNamespace(lora_path="/l/a.safetensors", stopped=False, steps=3,
                                   skipped=[("000_broken.png", "image file is truncated")] +
                                           [(f"tiny{i}.png", "too small") for i in range(6)])
    session = TrainSession(lambda cb: result).start()
    session.wait(5)
    done, skipped = session.summary().splitlines()
    assert done == "Done: 3 steps. LoRA: /l/a.safetensors"
    assert skipped.startswith("Skipped 7 image(s) training could not use: 000_broken.png (image file is truncated); "
                              "tiny0.png (too small)") and skipped.endswith("; and 2 more.")


def test_a_failure_after_the_lora_is_saved_is_a_warning_and_the_lora_is_still_registered(tmp_path):
    from lora_trainer.ui import Backend, start_run

    registered = []

    class Failing(Backend):
        def train(self, cfg, callbacks, task_id=""):
            callbacks.on_loss(1, 0.5, 1e-4)
            callbacks.on_progress(1, 1)
            callbacks.on_saved(tmp_path / "a.safetensors", True)
            raise RuntimeError("the last sample grid ran out of memory")

        def after_training(self, cfg, result, session):
            registered.append(result.lora_path)
            raise OSError("the card could not be written")

    session = start_run(Failing(), cfg=None)
    session.wait(5)
    lines = session.summary().splitlines()
    assert session.error is None and lines[0] == f"Done: 1 steps. LoRA: {tmp_path / 'a.safetensors'}"
    assert lines[1] == "Warning: after the LoRA was saved: RuntimeError: the last sample grid ran out of memory"
    assert lines[2] == "Warning: the LoRA is saved, but registering it failed: OSError: the card could not be written"
    assert registered == [tmp_path / "a.safetensors"] and session.result.losses == [0.5]


def test_tab_plot_shows_validation_losses_at_their_steps():
    from lora_trainer.evaluate.loss_plot import VALIDATION
    from lora_trainer.ui.session import SessionCallbacks

    cb = SessionCallbacks()
    for step in range(11, 21):  # a run resumed at step 10
        cb.on_loss(step, 1.0 / step, 1e-4)
    cb.on_validation(15, 0.08)
    cb.on_validation(20, 0.06)
    assert cb.first_step == 11 and cb.val_losses == [(15, 0.08), (20, 0.06)]
    rgb = tuple(int(VALIDATION[i:i + 2], 16) for i in (1, 3, 5))
    colors = {c for _, c in cb.plot().getcolors(maxcolors=1 << 20)}
    assert any(sum(abs(a - b) for a, b in zip(c, rgb)) < 12 for c in colors)
