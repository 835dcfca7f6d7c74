"""Experiments: the queue (order, cancel, a SIGKILLed run resumed first to the same LoRA), sweeps (one run per
combination, one shared cache: the VAE encodes each image once for the whole sweep), compare (the best run by
validation loss, the grid of one run's checkpoints, --json) and the one-line refusals of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_trainer.cli.commands import main
from lora_trainer.config import TrainConfig
from lora_trainer.errors import ConfigError
from lora_trainer.experiments.compare import compare_runs, read_run
from lora_trainer.experiments.queue import Queue
from lora_trainer.experiments.sweep import parse_grid, sweep_configs
from lora_trainer.training.loop import train

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("queue_worker.py")


def _yaml(path: Path, **values) -> str:
    import yaml

    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return str(path)


def _base(demo_folder, tiny_sd1_file, out, **extra):
    values = dict(train_data_dir=str(demo_folder), base_model=str(tiny_sd1_file), resolution=64, min_bucket_reso=64,
                  max_bucket_reso=128, lora_rank=4, lora_alpha=4, batch_size=2, learning_rate=1e-2, seed=0,
                  device="cpu", output_dir=str(out), output_name="style", max_train_steps=6, save_steps=3,
                  validation_split=0.25, validation_timesteps=2, save_precision="fp32", sample_steps=2)
    values.update(extra)
    return values


def _counting_vae(monkeypatch) -> list:
    from diffusers import AutoencoderKL

    calls = []
    original = AutoencoderKL.encode

    def encode(self, x, *args, **kwargs):
        calls.append(x.shape[0])
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", encode)
    return calls


def test_sweep_encodes_once_and_compare_names_the_lowest_val_loss(tmp_path, demo_folder, tiny_sd1_file, monkeypatch,
                                                                  capsys):
    config = _yaml(tmp_path / "style.yaml", **_base(demo_folder, tiny_sd1_file, tmp_path / "sweep"))
    calls = _counting_vae(monkeypatch)
    code = main(["sweep", "--config", config, "--grid", "learning_rate=1e-9,1e-2", "--grid", "lora_rank=2,4",
                 "--root", str(tmp_path), "--no-grid"])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, captured.err
    names = ["style-lr1e-9-r2", "style-lr1e-9-r4", "style-lr1e-2-r2", "style-lr1e-2-r4"]
    runs = [tmp_path / "sweep" / n for n in names]
    assert all((r / f"{r.name}.safetensors").is_file() for r in runs), out
    # 8 images (6 trained, 2 validation), one bucket each, no flip: 8 encodes for the 4 runs, not 32
    assert sum(calls) == 8
    assert len(list((tmp_path / "sweep" / "cache" / "latents").glob("*.safetensors"))) == 8
    assert not any((r / "cache").exists() for r in runs)
    assert list((tmp_path / "sweep" / "cache" / "text").glob("*.safetensors"))

    comparison = compare_runs(runs)
    by_name = {r["name"]: r for r in comparison["runs"]}
    lowest = min(by_name.values(), key=lambda r: r["val_loss_best"])
    assert comparison["best"] == lowest["name"]
    assert by_name[comparison["best"]]["config"]["learning_rate"] == 1e-2
    # config refuses a learning rate of 0; 1e-9 learns nothing in 6 steps: clearly worse
    for rigged in ("style-lr1e-9-r2", "style-lr1e-9-r4"):
        assert by_name[rigged]["val_loss_best"] > lowest["val_loss_best"] * 1.01
    assert f"best by validation loss: {comparison['best']}" in out  # the sweep ended with the comparison
    assert (tmp_path / "sweep" / "compare.html").is_file()
    assert all((r / "report.html").is_file() and (r / "config.yaml").is_file() for r in runs)

    assert main(["compare", *map(str, runs), "--json", "--no-grid"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["best"] == comparison["best"]
    for run in printed["runs"]:
        assert set(run) == {"name", "path", "config", "val_loss_final", "val_loss_best", "best_strength",
                            "clip_score", "steps", "seconds", "peak_bytes"}
        assert run["steps"] == 6 and run["seconds"] > 0 and run["peak_bytes"] > 2**20
        assert run["config"]["cache_dir"] == str(tmp_path / "sweep" / "cache")


def test_compare_grid_of_one_runs_checkpoints(tmp_path, demo_folder, tiny_sd1_file, capsys):
    from PIL import Image

    cfg = TrainConfig(**_base(demo_folder, tiny_sd1_file, tmp_path / "one", max_train_steps=4, save_steps=2,
                              sample_prompts=["a red circle"]))
    result = train(cfg)
    assert main(["compare", str(result.output_dir), "--strengths", "0,1"]) == 0
    out = capsys.readouterr().out
    grid = Image.open(result.output_dir / "compare.png")
    # rows: step 2, step 4 and the final LoRA; columns: 2 strengths (each 64 px plus labels)
    assert grid.width >= 2 * 64 and grid.height >= 3 * 64
    assert "best by validation loss: style" in out
    assert (result.output_dir / "compare.html").is_file()


def test_queue_killed_in_its_second_run_resumes_it_first_to_the_same_lora(tmp_path, demo_folder, tiny_sd1_file):
    def fill(root):
        queue = Queue(root)
        for name in ("first", "second", "third"):
            queue.add(TrainConfig(**_base(demo_folder, tiny_sd1_file, root / name, output_name=name,
                                          max_train_steps=6, save_steps=2, validation_split=0.0)))
        return queue

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    killed_queue = fill(tmp_path / "killed")
    killed = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "killed"), "--kill-run", "0002",
                             "--kill-after", "3"], env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr
    states = {j["name"]: j["state"] for j in killed_queue.jobs()}
    assert states == {"first": "done", "second": "running", "third": "queued"}

    resumed = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "killed")], env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.split() == ["0002", "done", "0003", "done"]  # the interrupted run first
    log = (tmp_path / "killed" / "second" / "logs" / "train.jsonl").read_text()
    assert '"step": 3' in log  # it went on from its step-2 state, in the same folder

    plain = fill(tmp_path / "plain")
    plain.run(lambda cfg, callbacks, resume: train(cfg, callbacks, resume=resume))
    for name in ("first", "second", "third"):
        a = load_file(str(tmp_path / "killed" / name / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "plain" / name / f"{name}.safetensors"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_queue_order_list_and_cancel(tmp_path, demo_folder, tiny_sd1_file, capsys):
    config = _yaml(tmp_path / "a.yaml", **_base(demo_folder, tiny_sd1_file, tmp_path / "a", max_train_steps=2,
                                                validation_split=0.0, save_steps=0))
    root = str(tmp_path / "root")
    assert main(["queue", "add", "--config", config, "--root", root]) == 0
    assert main(["queue", "add", "--config", config, "--set", "output_name=b", "--set",
                 f"output_dir={tmp_path / 'b'}", "--root", root]) == 0
    assert main(["queue", "cancel", "0001", "--root", root]) == 0
    capsys.readouterr()
    assert main(["queue", "list", "--json", "--root", root]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(j["id"], j["name"], j["state"]) for j in listed] == [("0001", "style", "cancelled"), ("0002", "b", "queued")]
    assert main(["queue", "run", "--root", root]) == 0
    jobs = Queue(root).jobs()
    assert [j["state"] for j in jobs] == ["cancelled", "done"]
    assert jobs[1]["step"] == jobs[1]["total"] == 2 and Path(jobs[1]["lora"]).is_file()
    assert not (tmp_path / "a").exists()  # the cancelled run never started
    assert main(["queue", "cancel", "0002", "--root", root]) == 2
    assert "is done already" in capsys.readouterr().err
    assert main(["queue", "cancel", "0009", "--root", root]) == 2
    assert "has no run 0009" in capsys.readouterr().err


def test_a_queued_run_cancelled_while_it_trains_stops_and_keeps_its_state(tmp_path, demo_folder, tiny_sd1_file,
                                                                          monkeypatch):
    from lora_trainer.callbacks import Callbacks, MultiCallbacks
    from lora_trainer.experiments import queue as queue_mod

    monkeypatch.setattr(queue_mod._JobProgress, "every", 0.0)  # look at the file every step, not once a second

    queue = Queue(tmp_path)
    job = queue.add(TrainConfig(**_base(demo_folder, tiny_sd1_file, tmp_path / "c", max_train_steps=20,
                                        save_steps=0, validation_split=0.0)))

    class CancelAtStep2(Callbacks):
        def on_loss(self, step, loss, lr):
            if step == 2:
                queue.cancel(job["id"])

    def run(cfg, callbacks, resume):
        return train(cfg, MultiCallbacks(callbacks, CancelAtStep2()), resume=resume)

    (done,) = queue.run(run)
    assert done["state"] == "cancelled"
    assert (tmp_path / "c" / "state").is_dir() and not (tmp_path / "c" / "style.safetensors").exists()


@pytest.mark.parametrize("grid, message", [
    (["lora_rnk=8,16"], "--grid lora_rnk: not a config key. Did you mean 'lora_rank'?"),
    (["lora_rank=8,abc"], "--grid lora_rank=abc: lora_rank"),
    (["lora_rank"], "--grid expects key=value1,value2"),
    (["output_dir=a,b"], "the sweep names and places its runs itself"),
])
def test_sweep_refuses_bad_grids_in_one_line(tmp_path, demo_folder, tiny_sd1_file, capsys, grid, message):
    config = _yaml(tmp_path / "s.yaml", **_base(demo_folder, tiny_sd1_file, tmp_path / "s"))
    args = [x for g in grid for x in ("--grid", g)]
    assert main(["sweep", "--config", config, *args, "--root", str(tmp_path), "--no-run"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "queue").exists() or not Queue(tmp_path).jobs()  # nothing half-queued


def test_sweep_names_and_seeds(tmp_path, demo_folder, tiny_sd1_file):
    config = _yaml(tmp_path / "s.yaml", **_base(demo_folder, tiny_sd1_file, tmp_path / "s", seed=5))
    configs = sweep_configs(config, [], parse_grid(["optimizer=adamw,lion", "lora_rank=8"]), seeds=2)
    assert [c.output_name for c in configs] == ["style-adamw-r8-s5", "style-adamw-r8-s6", "style-lion-r8-s5",
                                                "style-lion-r8-s6"]
    assert [c.seed for c in configs] == [5, 6, 5, 6]
    assert {c.cache_dir for c in configs} == {str(tmp_path / "s" / "cache")}
    assert configs[2].output_dir == str(tmp_path / "s" / "style-lion-r8-s5")
    with pytest.raises(ConfigError, match="--seeds 0"):
        sweep_configs(config, [], parse_grid(["lora_rank=8"]), seeds=0)


def test_compare_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "pictures").mkdir()
    assert main(["compare", str(tmp_path / "pictures"), "--no-grid"]) == 2
    err = capsys.readouterr().err
    assert "is not a run folder" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ConfigError, match="is not a folder"):
        read_run(tmp_path / "missing")
