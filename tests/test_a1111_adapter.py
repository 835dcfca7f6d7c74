"""The A1111/Forge adapter against stand-in `modules.*` objects (tests/webui_stubs.py): form → config, a run as a
WebUI job (queue lock, progress API, Interrupt), model freed and restored, the LoRA in --lora-dir with its card,
refresh, the key check, the txt2img test grid and its infotext; Forge's differences."""

from __future__ import annotations

import copy
import json
import sys
import threading
import time
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import webui_stubs  # noqa: E402


@pytest.fixture
def webui(monkeypatch, tmp_path, tiny_sd1_file):
    """A1111 with the tiny SD1 checkpoint selected and loaded (its state dict is the loaded model's)."""
    from safetensors.torch import load_file

    weights = load_file(str(tiny_sd1_file))
    sd_model = types.SimpleNamespace(state_dict=lambda: weights, is_sd2=False)
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    return webui_stubs.install(monkeypatch, tmp_path, Path(tiny_sd1_file), sd_model)


@pytest.fixture
def tiny_train(monkeypatch, tiny_sd1):
    """backend.train's call of the core's train() gets a copy of the tiny model instead of loading the file."""
    import lora_trainer.training.loop as core

    real = core.train
    monkeypatch.setattr(core, "train", lambda cfg, callbacks=None, host=None, resume=None: real(
        cfg, callbacks=callbacks, host=host, resume=resume, components=copy.deepcopy(tiny_sd1)))


def _start(backend, cfg, after_step=None):
    """A run as the tab and the API start it (ui.start_run); `after_step(step)` is called after each step."""
    from lora_trainer_a1111.host import A1111Callbacks

    from lora_trainer.ui import start_run

    class Watched(A1111Callbacks):
        def on_progress(self, step, total):
            super().on_progress(step, total)
            if after_step is not None:
                after_step(step)

    backend.progress_callbacks = Watched
    return start_run(backend, cfg)


def test_form_maps_to_config(webui, demo_folder, tmp_path):
    from lora_trainer_a1111.host import A1111Backend

    from lora_trainer.ui import form_to_config

    backend = A1111Backend()
    selected = backend.default_base_model()
    assert selected == webui.checkpoint.title and backend.base_model_choices() == [selected]
    assert backend.resolve_base_model(selected) == webui.checkpoint.filename  # the dropdown's title → the file
    assert backend.resolve_base_model("/models/other.safetensors") == "/models/other.safetensors"  # typed path
    cfg = form_to_config("my style", str(demo_folder), backend.resolve_base_model(selected), "inkwash", "character",
                         True, {"lora_alpha": 16, "epochs": 3, "target_modules": "to_q, to_v"}, backend.output_root())
    assert cfg.output_name == "my style" and cfg.trigger_word == "inkwash"
    assert cfg.base_model == webui.checkpoint.filename
    assert cfg.lora_rank == 32  # the preset's, as the form shows it (not sent: kept)
    assert cfg.epochs == 3 and cfg.target_modules == ["to_q", "to_v"]
    assert cfg.gradient_checkpointing and cfg.gradient_accumulation_steps == 4  # low VRAM
    assert Path(cfg.output_dir) == tmp_path / "outputs" / "lora_trainer" / "my style"


def test_run_is_a_webui_job_and_publishes_with_card(webui, make_cfg, tiny_train):
    from lora_trainer_a1111.host import A1111Backend

    backend = A1111Backend()
    cfg = make_cfg(max_train_steps=2, trigger_word="inkwash", base_model=webui.checkpoint.filename)
    seen = []  # after each step: is the queue lock held, and what the WebUI's progress API answers for the task
    session = _start(backend, cfg, lambda step: seen.append(
        (webui.call_queue.queue_lock.locked(), webui.progress.progress_of(session.task_id))))
    session.wait(120)
    result = session.result
    assert session.error is None and result is not None and not result.stopped

    task = session.task_id
    assert task.startswith("task(lora_trainer-")
    assert webui.progress.log == [("queued", task), ("start", task), ("finish", task)]
    assert webui.state.log == [("begin", task), ("end", task)]
    assert seen and all(locked for locked, _ in seen)  # txt2img/img2img wait while it trains
    assert all(p["active"] and not p["completed"] for _, p in seen)
    assert seen[-1][1]["progress"] == 1.0 and "step 2/2, loss" in seen[-1][1]["textinfo"]
    assert webui.progress.progress_of(task)["completed"] and not webui.call_queue.queue_lock.locked()

    assert webui.calls[0] == ("cpu", webui.sd_model) and ("gpu", webui.sd_model) in webui.calls  # freed, restored
    assert webui.calls.index(("gpu", webui.sd_model)) > webui.calls.index(("refresh",))
    assert result.lora_path.parent == webui.lora_dir and result.lora_path.name == "lora.safetensors"

    # Registered by the run itself (so also for runs started through the API): card, preview, refresh, key check.
    assert session.notice == ""  # every key matches A1111's naming of the tiny model's modules
    assert session.summary().startswith("Done: 2 steps.")
    card = json.loads(result.lora_path.with_suffix(".json").read_text())
    assert card["activation text"] == "inkwash" and card["preferred weight"] == 0.8 and card["sd version"] == "SD1"
    assert result.lora_path.with_suffix(".preview.png").is_file()  # the card's picture
    assert webui.calls.count(("refresh",)) == 2  # by the core after publishing, and after the card
    log = [json.loads(x) for x in (Path(cfg.output_dir) / "logs" / "train.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log if x["event"] == "loss"] == [1, 2]  # tab and API runs log like the CLI
    assert list((Path(cfg.output_dir) / "logs").glob("events.out.tfevents.*"))


def test_a_truncated_first_image_is_skipped_named_and_never_the_preview(webui, make_cfg, tiny_train, demo_folder):
    """The real A1111 run that ended in "Error: OSError: image file is truncated": the first image (in name order)
    is a truncated PNG and there are no sample prompts, so the card's preview comes from a training image."""
    from PIL import Image
    from lora_trainer_a1111.host import A1111Backend

    (demo_folder / "000_broken.png").write_bytes((demo_folder / "img001.png").read_bytes()[:300])
    cfg = make_cfg(max_train_steps=2, trigger_word="inkwash", base_model=webui.checkpoint.filename)
    session = _start(A1111Backend(), cfg)
    session.wait(120)
    summary = session.summary()
    assert session.error is None and summary.startswith("Done: 2 steps."), summary
    assert "Error" not in summary and "Skipped 1 image(s)" in summary and "000_broken.png" in summary
    assert session.result.skipped[0][0] == "000_broken.png"
    preview = session.result.lora_path.with_suffix(".preview.png")
    with Image.open(preview) as shown, Image.open(demo_folder / "img001.png") as first_usable:
        assert shown.size == first_usable.size and shown.convert("RGB").tobytes() == first_usable.convert("RGB").tobytes()
    assert json.loads(session.result.lora_path.with_suffix(".json").read_text())["activation text"] == "inkwash"
    assert webui.calls.count(("refresh",)) == 2  # the list refresh and the key check still ran
    assert session.notice == ""


def test_once_the_lora_is_saved_nothing_after_it_is_an_error(webui, make_cfg, tiny_train, monkeypatch):
    """Card, list refresh, key check and putting the model back each fail: the run is still "Done", with a
    warning per failure, and each step after a failed one still runs."""
    import lora_trainer_a1111.host as host
    from lora_trainer_a1111.host import A1111Backend

    refreshes = []

    def broken_refresh():
        refreshes.append(1)
        raise RuntimeError("networks list is busy")

    def broken_restore(model):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(sys.modules["networks"], "list_available_networks", broken_refresh)
    monkeypatch.setattr(webui.sd_models, "send_model_to_device", broken_restore)
    monkeypatch.setattr(host, "write_card", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    monkeypatch.setattr(host, "check_against_host", lambda path: (_ for _ in ()).throw(KeyError("model.diffusion")))
    session = _start(A1111Backend(), make_cfg(max_train_steps=1, base_model=webui.checkpoint.filename))
    session.wait(120)
    lines = session.summary().splitlines()
    assert session.error is None and lines[0].startswith("Done: 1 steps."), lines
    *warnings, report = lines[1:]
    assert report == f"Report: {session.result.output_dir / 'report.html'}"  # the run's page, last
    assert all(w.startswith("Warning: ") for w in warnings) and len(warnings) == 4, warnings
    assert "could not be put back on the GPU" in warnings[0] and "CUDA error" in warnings[0]
    assert "card" in warnings[1] and "disk full" in warnings[1]
    assert "not refreshed" in warnings[2] and "not checked" in warnings[3]
    assert len(refreshes) == 2  # the core's refresh after publishing, and the tab's after the card
    assert session.result.lora_path.is_file()


def test_captioner_weights_folder_is_under_the_webuis_models(webui, tmp_path, monkeypatch, demo_folder):
    import lora_trainer.data.captions as captions
    from lora_trainer.data.captions import MissingWeights
    from lora_trainer_a1111.host import A1111Backend

    from lora_trainer.ui.dataset_panel import caption_empty, weight_choices

    backend = A1111Backend()
    folder = backend.captioner_weights_dir()
    assert folder == tmp_path / "models" / "lora_trainer" / "captioner"
    folder.mkdir(parents=True)
    (folder / "coca_l14.safetensors").write_bytes(b"0")
    assert str(folder / "coca_l14.safetensors") in weight_choices(backend)

    seen = []

    def no_weights(folder_, options=None, callbacks=None, **_):
        seen.append(options.pretrained)
        raise MissingWeights(options.model, "mscoco_finetuned_laion2B-s13B-b90k", tmp_path / "cache", "https://hf/x.bin")
        yield  # a generator, as caption_folder is

    monkeypatch.setattr(captions, "caption_folder", no_weights)
    status = caption_empty(backend, "task(c)", str(demo_folder), "inkwash", str(folder / "coca_l14.safetensors"))[3]
    assert seen == [str(folder / "coca_l14.safetensors")]  # CaptionOptions(pretrained=the picked file)
    assert f"put it in {folder}" in status and '"Captioner weights"' in status
    assert "--pretrained" not in status and "--download" not in status
    assert webui.calls[-1] == ("gpu", webui.sd_model)  # the model is back after the failed captioning


def test_run_waits_for_the_webuis_current_job(webui, make_cfg, tiny_train):
    from lora_trainer_a1111.host import A1111Backend

    backend = A1111Backend()
    lock = webui.call_queue.queue_lock
    lock.acquire()  # a txt2img generation is running
    try:
        session = _start(backend, make_cfg(max_train_steps=1))
        time.sleep(0.5)
        assert session.running and session.callbacks.step == 0
        assert "waiting for the WebUI" in session.callbacks.status
        assert webui.progress.progress_of(session.task_id)["queued"]  # the bar says "In queue"
    finally:
        lock.release()
    session.wait(120)
    assert session.error is None and session.result.steps == 1


def test_webui_interrupt_stops_within_a_step_and_resets(webui, make_cfg, tiny_train):
    from lora_trainer_a1111.host import A1111Backend

    backend = A1111Backend()
    # at step 2: the WebUI's Interrupt button, or POST /sdapi/v1/interrupt
    session = _start(backend, make_cfg(max_train_steps=50), lambda step: step == 2 and webui.state.interrupt())
    session.wait(120)
    result = session.result
    assert result.stopped and result.steps == 2 and Path(result.state_dir).is_dir()  # resumable
    assert webui.calls[-1] == ("gpu", webui.sd_model)  # the model is back
    assert not list(webui.lora_dir.glob("*.safetensors"))
    assert not webui.state.interrupted  # the next WebUI job does not inherit the interrupt
    assert not list(webui.lora_dir.glob("*.json"))  # nothing registered for a stopped run


def test_caption_is_a_webui_job_with_the_model_off_the_gpu(webui, monkeypatch, demo_folder):
    import lora_trainer.data.captions as captions
    from lora_trainer.data.captions import CaptionResult
    from lora_trainer_a1111.host import A1111Backend

    seen = []

    def fake_caption_folder(folder, options=None, callbacks=None, **_):  # the captioner's contract, no weights
        seen.append((webui.call_queue.queue_lock.locked(), list(webui.calls)))
        yield CaptionResult("a.png", "kept", "old", "old")
        for i, name in enumerate(["b.png", "c.png"], 1):
            callbacks.on_progress(i, 2)
            yield CaptionResult(name, "new", f"{options.trigger}, a house")

    monkeypatch.setattr(captions, "caption_folder", fake_caption_folder)
    assert A1111Backend().caption(demo_folder, "inkwash", task_id="task(cap)") == 2  # the kept one not counted
    assert seen == [(True, [("cpu", webui.sd_model)])]  # under the queue lock, the WebUI's model on the CPU
    assert webui.calls[-1] == ("gpu", webui.sd_model)
    assert webui.progress.log == [("queued", "task(cap)"), ("start", "task(cap)"), ("finish", "task(cap)")]
    assert webui.state.textinfo == "Captioning: image 2/2"


@pytest.fixture
def no_default_weights(monkeypatch, tmp_path):
    """No captioner weights in any cache: "(auto)" finds nothing."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))


def test_test_grid_through_webui_txt2img_without_weights_is_the_plain_grid(webui, make_cfg, tmp_path,
                                                                           no_default_weights):
    from lora_trainer_a1111.host import A1111Backend

    from lora_trainer.evaluate.sample import label_grid
    from lora_trainer.ui.strengths import run_test

    backend = A1111Backend()
    cfg = make_cfg(trigger_word="inkwash", resolution=64)
    tried = run_test(backend, cfg, tmp_path / "my-lora.safetensors", "", 1234, "task(grid)", "(auto)")
    runs = [c for c in webui.calls if c[0] == "txt2img"]
    assert [r[1]["prompt"] for r in runs] == ["inkwash", "inkwash <lora:my-lora:0.5>", "inkwash <lora:my-lora:0.6>",
                                              "inkwash <lora:my-lora:0.7>", "inkwash <lora:my-lora:0.8>"]
    assert {r[1]["seed"] for r in runs} == {1234} and {r[1]["width"] for r in runs} == {64}
    assert all(r[1]["do_not_save_samples"] and r[1]["do_not_save_grid"] for r in runs)
    assert runs[0][2] == threading.current_thread().name  # A1111: on the caller's thread
    # what Send to txt2img pastes: the prompt with its <lora:…> tag (the WebUI's own infotext drops it)
    assert tried.infotext.startswith("inkwash <lora:my-lora:0.8>\nSteps: 20") and "Seed: 1234" in tried.infotext
    assert webui.progress.log == [("queued", "task(grid)"), ("start", "task(grid)"), ("finish", "task(grid)")]
    assert webui.state.job_no == 5 and webui.state.log[0] == ("begin", "task(grid)")

    # Without the captioner's weights: the grid as it always was, and the status says why there are no scores.
    status = tried.status.splitlines()
    assert status[0] == "grid at strengths 0, 0.5, 0.6, 0.7, 0.8" and tried.report is None
    assert status[1].startswith("scoring skipped: Captioner weights for coca_ViT-L-14")
    assert f"put it in {backend.captioner_weights_dir()}" in status[1] and '"Captioner weights"' in status[1]
    assert "--pretrained" not in tried.status and len(status) == 2
    assert not [c for c in webui.calls if c[0] in ("cpu", "gpu")]  # the WebUI's model was never moved for it
    pictures, _ = backend.test_pictures(cfg, tmp_path / "my-lora.safetensors", "inkwash", 1234)
    plain = label_grid([pictures], [f"strength {w:g}" for w in (0, 0.5, 0.6, 0.7, 0.8)], ["inkwash"], 1234)
    assert tried.grid.size == plain.size == (5 * 64, plain.height) and tried.grid.tobytes() == plain.tobytes()


def test_test_without_a_usable_image_folder_says_so(webui, make_cfg, tmp_path, tiny_coca):
    from lora_trainer_a1111.host import A1111Backend

    from lora_trainer.ui.strengths import run_test

    config, weights, _ = tiny_coca
    backend = A1111Backend()
    backend.captioner_model = str(config)
    (tmp_path / "empty").mkdir()
    for folder, why in [(tmp_path / "empty", "No images in"), (tmp_path / "gone", "is not there any more")]:
        cfg = make_cfg(trigger_word="inkwash", train_data_dir=str(folder))
        tried = run_test(backend, cfg, tmp_path / "my-lora.safetensors", "", 1, "task(t)", str(weights))
        assert tried.grid is not None and tried.report is None
        assert tried.status.splitlines()[1].startswith("scoring skipped: ") and why in tried.status


def test_test_scores_and_writes_the_best_strength_into_the_card_and_the_usage_hint(webui, make_cfg, tiny_train,
                                                                                   tiny_coca, monkeypatch):
    """The Test through the WebUI's txt2img, scored with the tiny CoCa: the scores under each column, the best
    strength in the status, the card's preferred weight and the file's modelspec.usage_hint, the tensors as they
    were. CoCa comes after the WebUI handed back the Test's memory, with the WebUI's model off the GPU, and goes
    before the model comes back, all in the one WebUI job."""
    import lora_trainer.data.captions.coca as coca
    import lora_trainer_a1111.host as host
    from lora_trainer_a1111.host import A1111Backend

    from lora_trainer.adapters.export import addnet_hash, read_lora
    from lora_trainer.ui.strengths import run_test

    config, weights, _ = tiny_coca
    backend = A1111Backend()
    backend.captioner_model = str(config)
    cfg = make_cfg(max_train_steps=1, trigger_word="inkwash", base_model=webui.checkpoint.filename)
    session = _start(backend, cfg)
    session.wait(120)
    lora = session.result.lora_path
    assert lora.parent == webui.lora_dir
    assert json.loads(lora.with_suffix(".json").read_text())["preferred weight"] == 0.8
    before, before_meta = lora.read_bytes(), read_lora(lora, with_tensors=False)[1]
    webui.calls.clear()

    real_load, real_release, real_release_test = coca.load_coca, coca.release, host.release_test_memory
    monkeypatch.setattr(coca, "load_coca", lambda *a, **k: webui.calls.append(("coca",)) or real_load(*a, **k))
    monkeypatch.setattr(coca, "release", lambda m: webui.calls.append(("coca released",)) or real_release(m))
    monkeypatch.setattr(host, "release_test_memory", lambda: webui.calls.append(("released",)) or real_release_test())
    locked = []
    real_status = host.A1111Callbacks.on_status
    monkeypatch.setattr(host.A1111Callbacks, "on_status", lambda self, message: locked.append(
        webui.call_queue.queue_lock.locked()) or real_status(self, message))

    tried = run_test(backend, cfg, lora, "inkwash, a red house", 5, "task(test)", str(weights))
    report = tried.report
    assert report is not None and report.best in (0.5, 0.6, 0.7, 0.8) and report.base.strength == 0.0
    order = [c[0] for c in webui.calls if c[0] != "txt2img"]
    assert order == ["released", "cpu", "coca", "coca released", "gpu", "refresh"]
    assert webui.calls.index(("released",)) > max(i for i, c in enumerate(webui.calls) if c[0] == "txt2img")
    assert locked and all(locked)  # scoring inside the WebUI job, its status on the WebUI's progress bar
    assert webui.progress.log[-3:] == [("queued", "task(test)"), ("start", "task(test)"), ("finish", "task(test)")]

    lines = tried.status.splitlines()
    assert lines[0] == "grid at strengths 0, 0.5, 0.6, 0.7, 0.8"
    # the status names the rule that chose: which branch applies depends on the tiny random models' pictures
    kept = any(s.fidelity >= report.base.fidelity - 0.03 for s in report.scores)
    rule = "fidelity stays within 0.03" if kept else "no strength keeps the prompt"
    assert lines[1].startswith(f"best strength {report.best:g} (combined ") and rule in lines[1]
    hint = f"<lora:{cfg.name}:{report.best:g}> inkwash"
    assert lines[2] == (f"strength {report.best:g} written into the card's preferred weight (lora.json) and the usage "
                        f"hint of lora.safetensors ({hint})")
    assert tried.grid.width == 5 * 64 and tried.grid.height > 64 + 2 * 18  # the scores' line under the columns
    # Send to txt2img takes the best strength's picture
    assert tried.infotext.startswith(f"inkwash, a red house <lora:lora:{report.best:g}>\nSteps: 20")

    card = json.loads(lora.with_suffix(".json").read_text())
    assert card["preferred weight"] == report.best and card["activation text"] == "inkwash"  # the rest kept
    after_meta = read_lora(lora, with_tensors=False)[1]
    assert after_meta["modelspec.usage_hint"] == hint
    assert {k: v for k, v in after_meta.items() if k != "modelspec.usage_hint"} == \
        {k: v for k, v in before_meta.items() if k != "modelspec.usage_hint"}
    after = lora.read_bytes()
    data = [blob[8 + int.from_bytes(blob[:8], "little"):] for blob in (before, after)]
    assert data[0] == data[1]  # the tensors, byte for byte
    from safetensors.torch import load_file

    tensors = load_file(str(lora))
    assert addnet_hash(tensors) == after_meta["sshs_model_hash"] == before_meta["sshs_model_hash"]
    assert oct(lora.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # published with the usual mode
    assert not list(webui.lora_dir.glob(".*.tmp"))


def test_test_keeps_the_grid_when_scoring_or_writing_fails(webui, make_cfg, tmp_path, tiny_coca, monkeypatch):
    import lora_trainer.data.captions.coca as coca
    from lora_trainer_a1111.host import A1111Backend

    from lora_trainer.ui.strengths import run_test

    config, weights, _ = tiny_coca
    backend = A1111Backend()
    backend.captioner_model = str(config)
    cfg = make_cfg(trigger_word="inkwash")
    lora = tmp_path / "gone.safetensors"  # no file: the card can be written, the file's usage hint cannot
    tried = run_test(backend, cfg, lora, "", 1, "task(a)", str(weights))
    lines = tried.status.splitlines()
    assert tried.report is not None and tried.grid is not None
    assert lines[2] == f"strength {tried.report.best:g} written into the card's preferred weight (gone.json)"
    assert lines[3].startswith("Warning: the usage hint in the LoRA file was not updated: ModelError: LoRA file "
                               "not found")
    assert json.loads(lora.with_suffix(".json").read_text()) == {"preferred weight": tried.report.best}

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(coca, "load_coca", out_of_memory)
    webui.calls.clear()
    tried = run_test(backend, cfg, lora, "", 1, "task(b)", str(weights))
    assert tried.report is None and tried.grid is not None and tried.infotext.startswith("inkwash <lora:gone:0.8>")
    assert tried.status.splitlines()[1] == "scoring skipped: RuntimeError: CUDA out of memory"
    assert webui.calls[-1] == ("gpu", webui.sd_model)  # the WebUI's model is back all the same


def _umask():
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_lora_dir_default(webui, tmp_path):
    from lora_trainer_a1111.host import A1111Host

    webui.shared.cmd_opts.lora_dir = None
    assert A1111Host().lora_dir() == tmp_path / "models" / "Lora"


def test_no_model_loaded_is_left_unloaded(webui):
    from lora_trainer_a1111.host import A1111Host

    webui.sd_models.model_data.sd_model = None  # nothing loaded yet: do not make the WebUI load one
    host = A1111Host()
    host.free_gpu()
    host.restore_gpu()
    assert webui.calls == []


def test_forge_unloads_through_its_memory_manager_and_renders_on_its_main_thread(monkeypatch, tmp_path,
                                                                                  tiny_sd1_file, make_cfg):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    forge = webui_stubs.install(monkeypatch, tmp_path, Path(tiny_sd1_file), types.SimpleNamespace(), forge=True)
    from lora_trainer_a1111.host import A1111Backend, A1111Host, is_forge

    assert is_forge()
    host = A1111Host()
    host.free_gpu()
    host.restore_gpu()  # nothing by hand: Forge loads the model again at the next generation
    assert forge.calls == [("unload",)]

    A1111Backend().test_pictures(make_cfg(trigger_word="inkwash", resolution=64), tmp_path / "x.safetensors", "x", 1)
    threads = {c[2] for c in forge.calls if c[0] == "txt2img"}
    assert threads == {"forge-main-thread"}


def test_forge_key_check_uses_forges_loader(monkeypatch, tmp_path, tiny_sd1_file):
    import torch
    from safetensors.torch import save_file

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    model = types.SimpleNamespace(forge_objects=types.SimpleNamespace(
        unet=types.SimpleNamespace(model=object()), clip=types.SimpleNamespace(cond_stage_model=object())))
    webui_stubs.install(monkeypatch, tmp_path, Path(tiny_sd1_file), model, forge=True)
    webui_stubs.install_forge_lora(monkeypatch, {"lora_unet_a": "unet.a"}, {"lora_te_b": "clip.b"})
    from lora_trainer_a1111.host import check_against_host

    path = tmp_path / "l.safetensors"
    save_file({k: torch.zeros(2, 2) for k in ("lora_unet_a.lora_up.weight", "lora_te_b.alpha",
                                              "lora_unet_gone.lora_up.weight")}, str(path))
    message = check_against_host(path)
    assert message.startswith("Warning:") and "1 layer(s)" in message and "lora_unet_gone" in message

    model.forge_objects = None  # before Forge's first generation there is no model to check against
    assert "Not checked" in check_against_host(path)


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
    assert message.startswith("Warning:") and "1 layer" in message
    assert check_against_host(peft).startswith("Warning:")  # the same against the loaded model itself


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


def test_test_grid_hands_back_what_the_webui_kept(webui, make_cfg, tmp_path, monkeypatch):
    """A1111's Lora extension keeps a backup of every weight the LoRA touched and the last conds: after the Test
    grid the weights are restored from the backups, the backups and caches dropped."""
    from lora_trainer_a1111.host import A1111Backend

    import torch

    log = []
    merged = torch.nn.Linear(2, 2)  # a layer with a LoRA merged in, and the backup A1111 took of it
    merged.network_weights_backup = torch.zeros(2, 2)
    layers = {"a": merged, "b": torch.nn.Linear(2, 2)}
    webui.sd_model.network_layer_mapping = layers

    def restore(layer):  # extensions-builtin/Lora/networks.py: restore_weights_backup copies in place, as here
        log.append(("restore", layer))
        if getattr(layer, "network_weights_backup", None) is not None:
            layer.weight.copy_(layer.network_weights_backup)

    networks = types.SimpleNamespace(
        list_available_networks=lambda: None, loaded_networks=["net"], networks_in_memory={"x": "net"},
        network_restore_weights_from_backup=restore,
        network_reset_cached_weight=lambda layer: log.append(("reset", layer)))
    monkeypatch.setitem(sys.modules, "networks", networks)
    conds = [("key", "cond")]
    monkeypatch.setattr(webui.processing, "StableDiffusionProcessing",
                        types.SimpleNamespace(cached_c=conds, cached_uc=[("k", "uc")]), raising=False)
    webui.state.current_latent = "latent"
    A1111Backend().test_pictures(make_cfg(resolution=64), tmp_path / "my-lora.safetensors", "a house", 1)
    assert log == [("restore", layers["a"]), ("reset", layers["a"]), ("restore", layers["b"]), ("reset", layers["b"])]
    assert torch.equal(merged.weight, torch.zeros(2, 2)) and merged.weight.requires_grad  # restored, untouched otherwise
    assert networks.loaded_networks == [] and networks.networks_in_memory == {}
    assert conds == [None] and webui.state.current_latent is None


# -- Merge into checkpoint ------------------------------------------------------------------------

@pytest.fixture
def ckpt_folder(webui, tiny_sd1_file):
    """The tiny SD1 checkpoint as a real file in the WebUI's checkpoint folder (models/Stable-diffusion), listed."""
    import shutil

    folder = Path(webui.sd_models.model_path)
    folder.mkdir(parents=True)
    shutil.copy(tiny_sd1_file, folder / "base.safetensors")
    webui.sd_models.list_models()
    webui.calls.clear()
    return folder


def _finished_run(monkeypatch, lora_path):
    """The tab's last run, done, with `lora_path` as its LoRA (where Test and Merge into checkpoint find it)."""
    from lora_trainer.ui import TrainSession

    monkeypatch.setattr(TrainSession, "current", None)  # put back after the test
    session = TrainSession(lambda callbacks: types.SimpleNamespace(lora_path=lora_path, stopped=False)).start()
    session.wait(10)
    return session


def _a_lora(webui, family="sd1"):
    from test_merge import lora_file

    webui.lora_dir.mkdir(parents=True, exist_ok=True)
    return lora_file(family, webui.lora_dir / "style.safetensors")


def _merged(backend, base, strength, name=""):
    from lora_trainer.ui.merging import run_merge

    return list(run_merge(backend, base, strength, name))


def test_merge_into_checkpoint_lands_in_the_webuis_checkpoint_list(webui, ckpt_folder, make_cfg, tiny_train,
                                                                   monkeypatch, tmp_path):
    """Train in the tab, then Merge into checkpoint: the fields offer the card's preferred weight and the default
    name; the file lands in models/Stable-diffusion as the core's merge writes it, byte for byte; the WebUI's
    checkpoint list is refreshed as its refresh button does it and the tab's Base model list shows the new file; the
    WebUI's model, its GPU and its job queue are left alone."""
    from lora_trainer_a1111.card import set_preferred_weight
    from lora_trainer_a1111.host import A1111Backend
    from safetensors.torch import load_file

    from lora_trainer.adapters.merge import merge_into_checkpoint
    from lora_trainer.ui import TrainSession
    from lora_trainer.ui.merging import field_values

    monkeypatch.setattr(TrainSession, "current", None)
    backend = A1111Backend()
    assert field_values(backend, "base.safetensors", "") == (1.0, "")  # nothing trained yet
    session = _start(backend, make_cfg(max_train_steps=1, base_model=str(ckpt_folder / "base.safetensors")))
    session.wait(120)
    lora = session.result.lora_path
    assert field_values(backend, "base.safetensors", "") == (0.8, "base+lora-0.8.safetensors")  # the card's weight
    set_preferred_weight(lora, 0.6)  # as Test writes its best strength
    assert field_values(backend, "base.safetensors", "") == (0.6, "base+lora-0.6.safetensors")
    assert field_values(backend, "base.safetensors", "my merge") == (0.6, "my merge")  # a typed name stays

    webui.calls.clear()
    jobs = (list(webui.progress.log), list(webui.state.log))
    lines = _merged(backend, "base.safetensors", 0.6)
    out = ckpt_folder / "base+lora-0.6.safetensors"
    assert all(line.startswith(f"Merging lora.safetensors at 0.6 into base.safetensors → {out}: ")
               for line in lines[:-1])
    done = lines[-1].splitlines()
    assert done[0].startswith(f"Merged lora.safetensors at 0.6 into base.safetensors: {out} (") and len(done) == 2
    assert done[1] == 'In the WebUI\'s checkpoint list as "base+lora-0.6.safetensors".'
    assert webui.calls == [("list_models",)]  # the refresh button's refresh_checkpoints; no model moved, no unload
    assert (list(webui.progress.log), list(webui.state.log)) == jobs  # no WebUI job: generations need not wait
    assert "base+lora-0.6.safetensors" in backend.base_model_choices()
    assert backend.resolve_base_model("base+lora-0.6.safetensors") == str(out)  # selectable as a base too
    assert not list(ckpt_folder.glob(".*.tmp"))

    reference = merge_into_checkpoint(ckpt_folder / "base.safetensors", [(lora, 0.6)], tmp_path / "ref.safetensors")
    assert out.read_bytes() == reference.read_bytes()
    base, merged = load_file(str(ckpt_folder / "base.safetensors")), load_file(str(out))
    assert list(base) == list(merged) and any(not base[k].equal(merged[k]) for k in base)  # the LoRA is in


def test_merge_never_overwrites_and_names_the_existing_file(webui, ckpt_folder, monkeypatch):
    from lora_trainer_a1111.host import A1111Backend

    backend = A1111Backend()
    _finished_run(monkeypatch, _a_lora(webui))
    first = ckpt_folder / "base+style-1.safetensors"
    assert _merged(backend, "base.safetensors", 1.0)[-1].startswith(f"Merged style.safetensors at 1 into "
                                                                    f"base.safetensors: {first} (")
    written = first.read_bytes()
    for name in ("", "base+style-1.safetensors", "base+style-1"):  # the default name again, typed, without suffix
        assert _merged(backend, "base.safetensors", 1.0, name) == [
            f'{first} already exists and is never overwritten: give another name in "Merged checkpoint name".']
    mine = ckpt_folder / "mine.safetensors"
    mine.write_bytes(b"a checkpoint of the user's")
    assert _merged(backend, "base.safetensors", 0.5, "mine")[-1].startswith(f"{mine} already exists")
    assert first.read_bytes() == written and mine.read_bytes() == b"a checkpoint of the user's"
    assert webui.calls == [("list_models",)]  # only the first merge refreshed the list


@pytest.mark.parametrize("strength", ["abc", "", None, float("nan"), float("inf"), 2.5, -3, 0])
def test_merge_refuses_a_bad_strength_in_one_line(webui, ckpt_folder, monkeypatch, strength):
    from lora_trainer_a1111.host import A1111Backend

    _finished_run(monkeypatch, _a_lora(webui))
    [line] = _merged(A1111Backend(), "base.safetensors", strength)
    if strength == 0:
        assert line.startswith("Strength 0 merges nothing (the result would be the Base model)")
    else:
        assert line == f"Strength {strength!r}: give a number from -1 to 2 (the LoRA's weight in the merged " \
                       "checkpoint, as in <lora:name:weight>)."
    assert [p.name for p in ckpt_folder.iterdir()] == ["base.safetensors"] and webui.calls == []


def test_merge_before_a_lora_is_trained_says_train_first(webui, ckpt_folder, monkeypatch):
    import threading

    from lora_trainer_a1111.host import A1111Backend

    from lora_trainer.ui import TrainSession
    from lora_trainer.ui.merging import field_values

    backend = A1111Backend()
    monkeypatch.setattr(TrainSession, "current", None)
    assert _merged(backend, "base.safetensors", 1.0) == [
        "Train a LoRA first: Merge into checkpoint bakes the LoRA this tab trained into the Base model."]
    release = threading.Event()
    running = TrainSession(lambda callbacks: release.wait(10)).start()  # a run that has not saved its LoRA yet
    try:
        assert _merged(backend, "base.safetensors", 1.0) == [
            "The LoRA is still training: merge it when the run is done."]
        assert field_values(backend, "base.safetensors", "") == (1.0, "")
    finally:
        release.set()
        running.wait(10)
    assert [p.name for p in ckpt_folder.iterdir()] == ["base.safetensors"] and webui.calls == []


@pytest.mark.parametrize("name", ["../evil", "sub/x", "..", ".hidden", "a:b", "x\\y", "name."])
def test_merge_name_is_a_plain_file_name(webui, ckpt_folder, monkeypatch, name):
    from lora_trainer_a1111.host import A1111Backend

    _finished_run(monkeypatch, _a_lora(webui))
    [line] = _merged(A1111Backend(), "base.safetensors", 1.0, name)
    assert line.startswith(f"Merged checkpoint name {name!r}: give a plain file name")
    assert [p.name for p in ckpt_folder.iterdir()] == ["base.safetensors"]
    assert not list(ckpt_folder.parent.glob("*.safetensors")) and webui.calls == []


def test_merge_errors_from_the_core_are_one_line_and_write_nothing(webui, ckpt_folder, monkeypatch, tmp_path):
    from lora_trainer_a1111.host import A1111Backend

    backend = A1111Backend()
    _finished_run(monkeypatch, _a_lora(webui, "sdxl"))  # a LoRA made for SDXL, an SD1 base
    line = _merged(backend, "base.safetensors", 1.0)[-1]  # after the merge's progress lines, if any
    assert line == "Not merged: style.safetensors is an SDXL LoRA and base.safetensors is an SD 1.x checkpoint: merge " \
                   "LoRAs made for the base's family."
    ckpt = tmp_path / "old.ckpt"
    ckpt.write_bytes(b"pickle")
    line = _merged(backend, str(ckpt), 1.0)[-1]
    assert line.startswith("Not merged: old.ckpt: merge reads .safetensors checkpoints only")
    [line] = _merged(backend, "gone.safetensors", 1.0)
    assert line == 'Base model gone.safetensors: no checkpoint file there. Pick a checkpoint in "Base model" (a ' \
                   '.safetensors file).'
    assert [p.name for p in ckpt_folder.iterdir()] == ["base.safetensors"] and webui.calls == []


@pytest.mark.parametrize("forge", [False, True], ids=["a1111", "forge"])
def test_merge_writes_into_ckpt_dir_when_set(monkeypatch, tmp_path, tiny_sd1_file, forge):
    """--ckpt-dir, where the WebUI's own Checkpoint Merger writes too; the same on Forge."""
    import shutil

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    model = types.SimpleNamespace() if forge else types.SimpleNamespace(state_dict=dict, is_sd2=False)
    webui = webui_stubs.install(monkeypatch, tmp_path, Path(tiny_sd1_file), model, forge=forge)
    webui.shared.cmd_opts.ckpt_dir = str(tmp_path / "my checkpoints")
    Path(webui.shared.cmd_opts.ckpt_dir).mkdir()
    base = Path(webui.shared.cmd_opts.ckpt_dir) / "base.safetensors"
    shutil.copy(tiny_sd1_file, base)
    webui.sd_models.list_models()
    from lora_trainer_a1111.host import A1111Backend, is_forge

    assert is_forge() == forge
    _finished_run(monkeypatch, _a_lora(webui))
    lines = _merged(A1111Backend(), "base.safetensors", 0.5)
    out = base.parent / "base+style-0.5.safetensors"
    assert out.is_file() and lines[-1].endswith('In the WebUI\'s checkpoint list as "base+style-0.5.safetensors".')
    assert not Path(webui.sd_models.model_path).exists()  # models/Stable-diffusion untouched


def test_merge_list_refresh_failure_is_a_warning_and_the_file_stays(webui, ckpt_folder, monkeypatch):
    from lora_trainer_a1111.host import A1111Backend

    def busy():
        raise RuntimeError("the list is busy")

    monkeypatch.setattr(webui.shared_items, "refresh_checkpoints", busy)
    _finished_run(monkeypatch, _a_lora(webui))
    done = _merged(A1111Backend(), "base.safetensors", 0.7)[-1].splitlines()
    assert done[0].startswith("Merged style.safetensors at 0.7") and (ckpt_folder / "base+style-0.7.safetensors").is_file()
    assert done[1] == "Warning: the checkpoint list was not refreshed (press its refresh button): RuntimeError: the " \
                      "list is busy"


def test_merge_shows_how_much_is_written_and_runs_one_at_a_time(webui, ckpt_folder, monkeypatch):
    """While the merge writes (under its temporary name) the status says how much is on disk; a second Merge
    meanwhile is told to wait; the first then finishes."""
    import threading

    import lora_trainer.adapters.merge as core
    from lora_trainer_a1111.host import A1111Backend

    from lora_trainer.files import atomic_path
    from lora_trainer.ui import merging

    go = threading.Event()

    def slow_merge(base, loras, output, precision=None):  # the core's contract: atomic, one output file
        with atomic_path(output) as tmp:
            tmp.write_bytes(b"\0" * (1 << 20))
            go.wait(10)
        return output

    monkeypatch.setattr(core, "merge_into_checkpoint", slow_merge)
    monkeypatch.setattr(merging, "POLL_SECONDS", 0.05)
    _finished_run(monkeypatch, _a_lora(webui))
    backend = A1111Backend()
    seen, second = [], None
    for line in merging.run_merge(backend, "base.safetensors", 0.8, ""):
        seen.append(line)
        if " 1.0 MB of about " in line and second is None:
            second = _merged(backend, "base.safetensors", 0.5, "other")
            go.set()
    out = ckpt_folder / "base+style-0.8.safetensors"
    written = [line for line in seen if " 1.0 MB of about " in line]
    assert written and written[0].startswith(f"Merging style.safetensors at 0.8 into base.safetensors → {out}: "
                                             "1.0 MB of about ")
    assert second == ["A merge is already running: wait for it to end."]
    assert seen[-1].startswith(f"Merged style.safetensors at 0.8 into base.safetensors: {out} (1.0 MB, ")
    assert _merged(backend, "base.safetensors", 0.5, "other")[-1].startswith("Merged")  # the lock is free again


def test_automatic1111_refuses_a_flux_checkpoint_in_one_line(webui, make_cfg, tmp_path):
    import torch
    from safetensors.torch import save_file

    from lora_trainer.errors import ConfigError
    from lora_trainer_a1111.host import A1111Backend

    flux = tmp_path / "flux1-dev.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)}, str(flux))
    with pytest.raises(ConfigError) as err:
        A1111Backend().train(make_cfg(base_model=str(flux)), A1111Backend().progress_callbacks())
    said = str(err.value)
    assert said.startswith("flux1-dev.safetensors is a Flux.1 model: AUTOMATIC1111 1.10 cannot run Flux.")
    assert "\n" not in said and "Forge or ComfyUI" in said
    assert not webui.progress.log  # refused before any WebUI job was queued


def test_forge_trains_its_flux_model_with_the_encoders_and_vae_it_runs_with(monkeypatch, tmp_path, tiny_sd1_file,
                                                                          make_cfg):
    """The checkpoint from the tab, clip_l / t5xxl / ae from Forge's VAE / Text Encoder box (in any order, beside an
    unrelated file), T5's tokenizer from Forge's backend/huggingface folder; the LoRA in the kohya Flux layout."""
    import shutil

    from safetensors.torch import load_file

    sys.path.insert(0, str(ROOT / "tests"))
    from flux_files import write_tiny_flux

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    forge = webui_stubs.install(monkeypatch, tmp_path, Path(tiny_sd1_file), types.SimpleNamespace(), forge=True)
    files = write_tiny_flux(tmp_path / "models", "dev")
    from lora_trainer_a1111.host import A1111Backend
    from lora_trainer_a1111.webui import FORGE_T5_TOKENIZER

    shutil.copytree(files["t5_tokenizer"], tmp_path.joinpath(*FORGE_T5_TOKENIZER))
    sys.modules["modules.shared"].opts.forge_additional_modules = [files["vae"], str(tiny_sd1_file), files["t5xxl"],
                                                                   files["clip_l"]]
    backend = A1111Backend()
    cfg = make_cfg(base_model=files["base_model"], target_modules=["attn"], max_train_steps=1)
    result = backend.train(cfg, backend.progress_callbacks())
    keys = load_file(str(result.lora_path))
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv.") for k in keys)
    assert ("unload",) in forge.calls  # Forge's model was off the GPU for the run
    from lora_trainer_a1111.card import lora_family

    assert lora_family(result.lora_path) == "flux"  # the card Forge's Lora pane shows says Flux
