"""The WebUI side under the installed gradio: the entry script registers its callbacks, on_ui_tabs builds the tab
with the A1111 backend (selected checkpoint, Send to txt2img, the WebUI's progress bar on Train and Test), and the
API routes start / report / cancel a run behind --api-auth."""

from __future__ import annotations

import importlib.util
import sys
import time
import types
from pathlib import Path

import pytest
from test_a1111_adapter import webui  # noqa: F401 - the stand-in modules.* fixture

from lora_trainer.ui import Backend

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def entry(webui, monkeypatch):  # noqa: F811
    registered = {}
    callbacks = types.SimpleNamespace(**{name: (lambda fn, n=name: registered.setdefault(n, fn))
                                         for name in ("on_ui_tabs", "on_ui_settings", "on_app_started")})
    monkeypatch.setitem(sys.modules, "modules.script_callbacks", callbacks)
    sys.modules["modules"].script_callbacks = callbacks
    spec = importlib.util.spec_from_file_location("lora_trainer_tab", ROOT / "scripts" / "lora_trainer_tab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return registered, module


def test_entry_registers_and_builds_the_tab(entry, webui, tmp_path, monkeypatch):  # noqa: F811
    import gradio as gr

    from lora_trainer.ui import TrainSession

    monkeypatch.setattr(TrainSession, "current", None)  # no LoRA trained in this process yet
    registered, _ = entry
    assert set(registered) == {"on_ui_tabs", "on_ui_settings", "on_app_started"}
    [(blocks, title, elem_id)] = registered["on_ui_tabs"]()
    assert isinstance(blocks, gr.Blocks) and title == "Train LoRA" and elem_id == "lora_trainer"
    by_id = {getattr(b, "elem_id", None): b for b in blocks.blocks.values()}
    base = by_id["lora_trainer_base"]
    assert base.value == webui.checkpoint.title and webui.checkpoint.title in str(base.choices)  # selected one
    # The captioner weights picker names the folder under the WebUI's models folder; Add images takes a zip.
    assert str(tmp_path / "models" / "lora_trainer" / "captioner") in by_id["lora_trainer_weights"].info
    assert ".zip" in by_id["lora_trainer_add_images"].file_types and "lora_trainer_findings" in by_id

    # "Send to txt2img": registered for the WebUI to bind after all tabs exist, fed by the test's infotext.
    [binding] = webui.infotext_utils.registered_param_bindings
    assert binding.tabname == "txt2img" and binding.paste_button is by_id["lora_trainer_send_to_txt2img"]
    assert binding.source_text_component is by_id["lora_trainer_infotext"]

    # Caption, Train and Test start the WebUI's progress bar (javascript/lora_trainer.js) and get its task id first.
    config = blocks.get_config_file()
    ids = {c["id"]: c.get("props", {}).get("elem_id") for c in config["components"]}
    jobs = [d for d in config["dependencies"] if d.get("js") == "loraTrainerStartJob"]
    assert {ids[t[0] if isinstance(t, (list, tuple)) else t] for d in jobs for t in d["targets"]} == \
        {"lora_trainer_caption", "lora_trainer_train", "lora_trainer_test"}
    assert all(ids[d["inputs"][0]] == "lora_trainer_task_id" for d in jobs)
    js = (ROOT / "javascript" / "lora_trainer.js").read_text()
    assert "function loraTrainerStartJob(" in js and "requestProgress(id, gradioApp().getElementById(" \
        "'lora_trainer_status')" in js

    # Merge into checkpoint: the LoRA's strength (1 until a LoRA is trained), the new file's name, the button; it
    # merges the Base model field's checkpoint, and the page then presses the WebUI's checkpoint refresh button.
    assert by_id["lora_trainer_merge_strength"].value == 1.0 and by_id["lora_trainer_merge_name"].value == ""
    assert "lora_trainer_merge" in by_id and "lora_trainer_merge_status" in by_id
    button = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "lora_trainer_merge_button")
    [merge] = [d for d in config["dependencies"] if d["outputs"] and  # gradio 3 lists the .then()s' targets too
               button in [t[0] if isinstance(t, (list, tuple)) else t for t in d["targets"]]]
    assert [ids[i] for i in merge["inputs"]] == ["lora_trainer_base", "lora_trainer_merge_strength",
                                                 "lora_trainer_merge_name"]
    assert [ids[i] for i in merge["outputs"]] == ["lora_trainer_merge_status", "lora_trainer_base"]
    assert [d for d in config["dependencies"] if d.get("js") == _entry_backend(entry).checkpoints_js]
    assert "function loraTrainerRefreshCheckpoints(" in js
    assert "'refresh_sd_model_checkpoint'" in js and "'forge_refresh_checkpoint'" in js


def _entry_backend(entry):
    return entry[1]._backend


class _Backend(Backend):
    def __init__(self, tmp):
        self.tmp = tmp

    def new_task_id(self):
        return "task(api-1)"

    def default_base_model(self):
        return "model.safetensors"

    def output_root(self):
        return self.tmp

    def progress_callbacks(self):
        return None

    def train(self, cfg, callbacks, task_id=""):
        for step in range(1, 200):
            if callbacks.should_stop():
                return types.SimpleNamespace(lora_path=None, stopped=True, steps=step, state_dir=self.tmp)
            callbacks.on_progress(step, 200)
            callbacks.on_loss(step, 1.0 / step, 1e-4)
            time.sleep(0.01)
        return types.SimpleNamespace(lora_path=self.tmp / "x.safetensors", stopped=False, steps=200, state_dir=None)


def test_api_routes_behind_auth(tmp_path, demo_folder):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    sys.path.insert(0, str(ROOT / "scripts"))
    from lora_trainer_a1111 import api

    app = FastAPI()
    api.mount(app, _Backend(tmp_path), "alice:secret")
    client = TestClient(app)
    body = {"name": "api-lora", "folder": str(demo_folder), "trigger_word": "inkwash"}
    assert client.post("/lora_trainer/train", json=body).status_code == 401
    assert client.post("/lora_trainer/train", json=body, auth=("alice", "wrong")).status_code == 401
    bad = client.post("/lora_trainer/train", json={**body, "name": "../x"}, auth=("alice", "secret"))
    assert bad.status_code == 400 and "LoRA name" in bad.json()["detail"]
    typo = client.post("/lora_trainer/train", json={**body, "options": {"lerning_rate": 1e-4}}, auth=("alice", "secret"))
    assert typo.status_code == 400 and "Did you mean 'learning_rate'?" in typo.json()["detail"]
    started = client.post("/lora_trainer/train", json=body, auth=("alice", "secret")).json()
    assert started["running"] is True
    time.sleep(0.2)
    client.post("/lora_trainer/cancel", auth=("alice", "secret"))
    for _ in range(100):
        status = client.get("/lora_trainer/status", auth=("alice", "secret")).json()
        if not status["running"]:
            break
        time.sleep(0.05)
    assert status["stopped"] is True and status["losses"] and status["step"] >= 1
    assert status["task_id"] == "task(api-1)"  # for the WebUI's POST /internal/progress


def test_api_open_without_api_auth(tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    sys.path.insert(0, str(ROOT / "scripts"))
    from lora_trainer_a1111 import api

    app = FastAPI()
    api.mount(app, _Backend(tmp_path), None)
    assert TestClient(app).get("/lora_trainer/status").status_code == 200
