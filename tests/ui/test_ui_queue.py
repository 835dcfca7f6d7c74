"""The tab's Queue under the installed gradio: the button takes Train's form, its run trains the tiny model after the
ones before it with the tab following (status, loss plot, the queue table with each run's report page), Stop ends
the queue and Run queue resumes that run from its saved state; and `GET`/`POST /lora_trainer/queue` behind
--api-auth (the queue's logic without gradio: tests/test_queue_api.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import TinyBackend  # noqa: E402
from test_queue_api import Fake  # noqa: E402

from lora_trainer.callbacks import Callbacks, MultiCallbacks  # noqa: E402
from lora_trainer.ui import TrainSession, build_blocks, form_to_config, preset_values  # noqa: E402
from lora_trainer.ui.queue_panel import RUNNER, queue_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _handlers(blocks):
    fns = blocks.fns.values() if isinstance(blocks.fns, dict) else blocks.fns
    return {f.fn.__name__: f.fn for f in fns if f.fn is not None}


@pytest.fixture(autouse=True)
def idle_runner(monkeypatch):
    monkeypatch.setattr(TrainSession, "current", None)
    yield
    RUNNER.wait(120)
    assert not RUNNER.running


def _form(folder, name):
    return [str(folder), "inkwash", name, "", "style", False, *preset_values("style", False).values()]


def test_queue_sits_by_train_and_takes_its_form():
    blocks = build_blocks(TinyBackend())
    config = blocks.get_config_file()
    ids = {c["id"]: c.get("props", {}).get("elem_id") for c in config["components"]}

    def inputs_of(elem_id):
        button = next(i for i, e in ids.items() if e == elem_id)
        deps = [d for d in config["dependencies"] if d["inputs"] and  # the click first (gradio 3 lists its .then()s)
                button in [t[0] if isinstance(t, (list, tuple)) else t for t in d["targets"]]]
        return [ids[i] for i in deps[0]["inputs"]]

    assert inputs_of("lora_trainer_queue") == inputs_of("lora_trainer_train")[1:]  # all but Train's task id
    row = next(b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == "lora_trainer_train").parent
    assert [getattr(c, "elem_id", None) for c in row.children][1:4] == \
        ["lora_trainer_train", "lora_trainer_queue", "lora_trainer_interrupt"]
    assert {"lora_trainer_queue_table", "lora_trainer_queue_refresh", "lora_trainer_queue_cancel"} <= set(ids.values())


def test_queued_runs_train_the_forms_config_and_the_table_follows(tmp_path, tiny_sd1, demo_folder):
    from lora_trainer.experiments.queue import Queue

    backend = TinyBackend(tmp_path / "runs", components=tiny_sd1, sample_steps=2, sample_size=64)
    h = _handlers(build_blocks(backend))
    status, table, follow = h["on_queue"](*_form(demo_folder, "tiny-a"))
    assert status.splitlines()[0] == "Queued run 0001 (tiny-a)." and follow is True
    assert "<td>0001</td><td>tiny-a</td>" in table
    assert h["on_queue"](*_form(demo_folder, "tiny-b"))[0].startswith("Queued run 0002 (tiny-b).")
    status, plot, sample, table = list(h["on_queue_watch"](True))[-1]

    runs = tmp_path / "runs"
    lines = status.splitlines()
    assert lines[0] == "Queue done: 0001 done, 0002 done." and lines[1].startswith("Done: 3 steps. LoRA: "), lines
    assert lines[-1] == f"Report: {runs / 'tiny-b' / 'report.html'}"  # the finished run's status names its page
    rows = [["0001", "tiny-a", "done", "3/3", str(runs / "tiny-a" / "report.html")],
            ["0002", "tiny-b", "done", "3/3", str(runs / "tiny-b" / "report.html")]]
    assert queue_rows(backend) == rows
    assert all(f"<td>{cell}</td>" in table for row in rows for cell in row) and "<th>progress</th>" in table
    assert plot.size == (512, 256) and sample and Path(sample).is_file()
    assert (runs / "tiny-a" / "tiny-a.safetensors").is_file() and (runs / "tiny-b" / "report.html").is_file()
    form_cfg = form_to_config("tiny-a", str(demo_folder), "", "inkwash", "style", False, {}, runs)
    assert Queue(runs).get("0001")["config"] == form_cfg.to_dict()  # the form's config, as Train builds it
    assert h["on_queue_refresh"]() == table


def test_queue_refuses_the_form_as_train_does(tmp_path, demo_folder):
    import gradio as gr

    h = _handlers(build_blocks(TinyBackend(tmp_path / "runs")))
    form = _form(demo_folder, "../escape")
    status, table, follow = h["on_queue"](*form)
    assert status == next(h["on_train"]("", *form))[0] and "LoRA name" in status
    assert "The queue is empty" in table and follow is False
    [kept] = list(h["on_queue_watch"](False))  # the message stays
    assert kept == [gr.update()] * 4
    assert h["on_queue_cancel"]("")[0] == "Type the run's id (the table's first column) into Run id to cancel it."
    assert h["on_queue_cancel"]("7")[0].endswith("has no run 7: the Queue table shows the ids.")
    assert h["on_queue_run"]()[0].startswith("Nothing to run")


class _StopsOnce(TinyBackend):
    """Six steps; the first time, the tab's Stop is pressed at step 2."""

    overrides = {"max_train_steps": 6}
    stop = None

    def train(self, cfg, callbacks, task_id="", resume=None):
        backend = self

        class PressStop(Callbacks):
            def on_progress(self, step, total):
                if resume is None and step == 2:
                    backend.stop()

        return super().train(cfg, MultiCallbacks(callbacks, PressStop()), task_id, resume)


def test_stop_ends_the_queue_and_run_queue_resumes_that_run(tmp_path, tiny_sd1, demo_folder):
    backend = _StopsOnce(tmp_path / "runs", components=tiny_sd1, sample_steps=2, sample_size=64)
    h = _handlers(build_blocks(backend))
    backend.stop = h["on_stop"]
    h["on_queue"](*_form(demo_folder, "tiny-stop"))
    status = list(h["on_queue_watch"](True))[-1][0]
    lines = status.splitlines()
    assert lines[0] == "Queue stopped at run 0001 (tiny-stop): Run queue resumes it first." and \
        lines[1].startswith("Stopped at step 2;"), lines
    assert queue_rows(backend)[0][2] == "stopped"  # (its progress: the queue file's last write, at most 1 a second)

    assert h["on_queue_run"]()[2] is True
    status = list(h["on_queue_watch"](True))[-1][0]
    assert status.splitlines()[:2] == ["Queue done: 0001 done.",
                                      f"Done: 6 steps. LoRA: {tmp_path / 'runs' / 'tiny-stop' / 'tiny-stop.safetensors'}"]
    assert queue_rows(backend)[0][2:4] == ["done", "6/6"]
    assert TrainSession.current.callbacks.first_step == 3  # resumed after step 2, in the same folder
    assert not (tmp_path / "runs" / "tiny-stop-v2").exists()


def test_queue_routes_behind_auth(tmp_path, demo_folder):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    sys.path.insert(0, str(ROOT / "scripts"))
    from lora_trainer_a1111 import api

    app = FastAPI()
    api.mount(app, Fake(tmp_path / "runs"), "alice:secret")
    client = TestClient(app)
    auth = ("alice", "secret")
    body = {"name": "api-lora", "folder": str(demo_folder), "trigger_word": "inkwash"}
    assert client.get("/lora_trainer/queue").status_code == 401
    assert client.post("/lora_trainer/queue", json=body, auth=("alice", "wrong")).status_code == 401
    bad = client.post("/lora_trainer/queue", json={**body, "name": "../x"}, auth=auth)
    assert bad.status_code == 400 and "LoRA name" in bad.json()["detail"]
    typo = client.post("/lora_trainer/queue", json={**body, "options": {"lerning_rate": 1e-4}}, auth=auth)
    assert typo.status_code == 400 and "Did you mean 'learning_rate'?" in typo.json()["detail"]
    assert client.get("/lora_trainer/queue", auth=auth).json() == {"runs": [], "running": False}

    added = client.post("/lora_trainer/queue", json=body, auth=auth).json()
    assert added["queued"]["id"] == "0001" and added["queued"]["name"] == "api-lora" and added["running"] is True
    assert [run["id"] for run in added["runs"]] == ["0001"]
    RUNNER.wait(30)
    listed = client.get("/lora_trainer/queue", auth=auth).json()
    assert listed["running"] is False and listed["runs"][0]["state"] == "done" and listed["runs"][0]["step"] == 20
    assert client.get("/lora_trainer/status", auth=auth).json()["message"].startswith("Done: 20 steps.")
