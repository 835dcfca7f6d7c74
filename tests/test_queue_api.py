"""The tab's queue without gradio (lora_trainer/ui/queue_panel.py) and its REST functions
(scripts/lora_trainer_a1111/api.py): runs train in order after the tab's own run, each a TrainSession as Train starts
one; Stop ends the queue and the next start resumes that run first; Cancel; a failed run; a queue another process
runs; the JSON bodies. The routes behind --api-auth are tested with FastAPI in tests/ui/test_ui_queue.py."""

from __future__ import annotations

import os
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from lora_trainer.errors import ConfigError
from lora_trainer.ui import Backend, TrainSession, form_to_config, start_run
from lora_trainer.ui.queue_panel import RUNNER, queue_rows, queue_run, runner_line

ROOT = Path(__file__).resolve().parents[1]


class Fake(Backend):
    """Trains `total` steps of 10 ms (`totals`: for a run by name), a state file saved when stopped; `hold` keeps the
    named run before its first step until released; a name in `fail` raises."""

    def __init__(self, root: Path, total: int = 20) -> None:
        self.root, self.total, self.totals = root, total, {}
        self.calls = []  # (name, resume) per train()
        self.hold = {}
        self.fail = set()

    def output_root(self):
        return self.root

    def train(self, cfg, callbacks, task_id="", resume=None):
        self.calls.append((cfg.output_name, resume))
        if cfg.output_name in self.hold:
            self.hold[cfg.output_name].wait(10)
        if cfg.output_name in self.fail:
            raise ConfigError(f"Image folder not found: {cfg.train_data_dir}.")
        out = Path(cfg.output_dir)
        (out / "state").mkdir(parents=True, exist_ok=True)
        first = int((out / "state" / "step").read_text()) + 1 if resume else 1
        total = self.totals.get(cfg.output_name, self.total)
        for step in range(first, total + 1):
            if callbacks.should_stop():
                (out / "state" / "step").write_text(str(step - 1))
                return types.SimpleNamespace(lora_path=None, stopped=True, steps=step - 1, state_dir=out / "state",
                                             output_dir=out)
            callbacks.on_progress(step, total)
            callbacks.on_loss(step, 1.0 / step, 1e-4)
            time.sleep(0.01)
        (out / "report.html").write_text("<html></html>")
        lora = out / f"{cfg.output_name}.safetensors"
        lora.write_bytes(b"lora")
        return types.SimpleNamespace(lora_path=lora, stopped=False, steps=total, state_dir=None, output_dir=out)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    monkeypatch.setattr(TrainSession, "current", None)
    backend = Fake(tmp_path / "runs")
    yield backend
    for hold in backend.hold.values():
        hold.set()
    RUNNER.wait(30)
    assert not RUNNER.running


def _cfg(backend, name, folder):
    return form_to_config(name, str(folder), "model.safetensors", "inkwash", "style", False, {}, backend.output_root())


def _until(check, timeout=10.0):
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def _states(backend):
    return [(row[1], row[2]) for row in queue_rows(backend)]


def test_queued_runs_train_in_order_after_the_tabs_run(fake, demo_folder):
    fake.hold["trained"] = threading.Event()
    train = start_run(fake, _cfg(fake, "trained", demo_folder))  # Train, before anything is queued
    first = queue_run(fake, _cfg(fake, "first", demo_folder))
    queue_run(fake, _cfg(fake, "second", demo_folder))
    assert first["id"] == "0001" and first["config"]["output_name"] == "first" and RUNNER.running
    time.sleep(0.2)
    assert _states(fake) == [("first", "queued"), ("second", "queued")]  # the tab's run goes first
    assert runner_line(fake) == "Queue: 2 run(s) wait for the current run to end."
    fake.hold["trained"].set()
    RUNNER.wait(30)
    assert train.result.lora_path.name == "trained.safetensors"
    assert [name for name, _ in fake.calls] == ["trained", "first", "second"]
    rows = queue_rows(fake)
    assert [row[:4] for row in rows] == [["0001", "first", "done", "20/20"], ["0002", "second", "done", "20/20"]]
    assert rows[0][4] == str(fake.root / "first" / "report.html")
    assert runner_line(fake) == "Queue done: 0001 done, 0002 done."
    session = TrainSession.current  # the last queued run: what the tab's status, Test and Merge take
    assert session.cfg.output_name == "second" and session.summary().splitlines() == [
        f"Done: 20 steps. LoRA: {fake.root / 'second' / 'second.safetensors'}",
        f"Report: {fake.root / 'second' / 'report.html'}"]


def test_stop_ends_the_queue_and_the_next_start_resumes_that_run_first(fake, demo_folder):
    fake.totals["first"] = 200
    queue_run(fake, _cfg(fake, "first", demo_folder))
    queue_run(fake, _cfg(fake, "second", demo_folder))
    _until(lambda: TrainSession.current is not None and TrainSession.current.callbacks.step >= 3)
    TrainSession.current.stop()  # the tab's Stop
    RUNNER.wait(30)
    assert _states(fake) == [("first", "stopped"), ("second", "queued")]
    assert runner_line(fake) == "Queue stopped at run 0001 (first): Run queue resumes it first."
    assert TrainSession.current.summary().startswith("Stopped at step ")
    fake.totals["first"] = 20
    RUNNER.start(fake)
    RUNNER.wait(30)
    assert fake.calls == [("first", None), ("first", str(fake.root / "first")), ("second", None)]
    assert _states(fake) == [("first", "done"), ("second", "done")]


def test_cancel_takes_a_queued_run_off_and_stops_the_running_one(fake, demo_folder):
    from lora_trainer.experiments.queue import Queue

    fake.totals["first"] = 400
    queue_run(fake, _cfg(fake, "first", demo_folder))
    queue_run(fake, _cfg(fake, "second", demo_folder))
    queue_run(fake, _cfg(fake, "third", demo_folder))
    queue = Queue(fake.root)
    assert queue.cancel("0003")["state"] == "cancelled"
    _until(lambda: TrainSession.current is not None and TrainSession.current.callbacks.step >= 2)
    assert queue.cancel("0001")["cancel"] is True  # running: it stops after its step, the queue goes on
    RUNNER.wait(30)
    assert _states(fake) == [("first", "cancelled"), ("second", "done"), ("third", "cancelled")]
    assert [name for name, _ in fake.calls] == ["first", "second"]


def test_a_failed_run_is_said_in_the_table_and_the_queue_goes_on(fake, demo_folder):
    fake.fail.add("first")
    queue_run(fake, _cfg(fake, "first", demo_folder))
    queue_run(fake, _cfg(fake, "second", demo_folder))
    RUNNER.wait(30)
    rows = queue_rows(fake)
    assert rows[0][:4] == ["0001", "first", "failed", ""] and rows[0][4].startswith("Image folder not found")
    assert rows[1][2] == "done" and runner_line(fake) == "Queue done: 0001 failed, 0002 done."


def test_a_queue_another_process_runs_is_left_to_it(fake, demo_folder):
    (fake.root / "queue").mkdir(parents=True)
    (fake.root / "queue" / "runner.lock").write_text(str(os.getppid()))  # a live process that is not this one
    queue_run(fake, _cfg(fake, "first", demo_folder))
    RUNNER.wait(30)
    assert fake.calls == [] and _states(fake) == [("first", "queued")]
    assert runner_line(fake).startswith(f"Queue stopped: The queue in {fake.root / 'queue'} is being run by process")


def _api():
    sys.path.insert(0, str(ROOT / "scripts"))
    from lora_trainer_a1111 import api

    return api


def test_api_queue_bodies_and_listing(fake, demo_folder):
    api = _api()
    body = {"name": "api-lora", "folder": str(demo_folder), "trigger_word": "inkwash", "options": {"epochs": 3}}
    for bad, said in [({"name": "../x"}, "LoRA name"), ({"folder": ""}, "Pick the image folder first."),
                      ({"options": {"lerning_rate": 1e-4}}, "Did you mean 'learning_rate'?"),
                      ({"options": [1]}, "options: give an object"), ({"name": 5}, "name: give a string, not int 5.")]:
        with pytest.raises(ConfigError) as err:
            api.queue_training({**body, **bad}, fake)
        assert said in str(err.value) and "\n" not in str(err.value)
    assert api.listing(fake) == {"runs": [], "running": False}  # nothing queued by the bad bodies

    answer = api.queue_training(body, fake)
    assert answer["running"] is True and answer["queued"]["id"] == "0001" and answer["queued"]["state"] == "queued"
    assert set(answer["queued"]) == {"id", "name", "state", "step", "total", "output_dir", "lora", "error"}
    assert [run["id"] for run in answer["runs"]] == ["0001"]
    RUNNER.wait(30)
    [run] = api.listing(fake)["runs"]
    assert run["state"] == "done" and run["step"] == 20 and run["lora"].endswith("api-lora.safetensors")
    assert api.listing(fake)["running"] is False and api.status()["message"].startswith("Done: 20 steps.")
