"""Kill -9 in the middle of a run, resume, and end with exactly the LoRA of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_trainer.errors import ResumeError
from lora_trainer.training.state import dataset_hash, load_state

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("resume_worker.py")


def run_worker(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(WORKER), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.once  # the same on every stack: the newest runs it
def test_sigkill_then_resume_gives_the_same_lora(demo_folder, tmp_path):
    straight = run_worker(demo_folder, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr

    killed = run_worker(demo_folder, tmp_path / "killed", "--kill-after", 5)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "lora.safetensors").exists()
    state = json.loads(next((tmp_path / "killed" / "state").glob("step-*/state.json")).read_text())
    assert state["step"] == 3  # the last checkpoint before the kill

    resumed = run_worker(demo_folder, tmp_path / "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(tmp_path / "straight" / "lora.safetensors"))
    b = load_file(str(tmp_path / "killed" / "lora.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_refuses_foreign_or_changed_runs(make_cfg, tmp_path):
    from lora_trainer.callbacks import Callbacks
    from lora_trainer.model import build_tiny_components
    from lora_trainer.training.loop import train

    class StopAt2(Callbacks):
        n = 0

        def on_loss(self, step, loss, lr):
            self.n = step

        def should_stop(self):
            return self.n >= 2

    cfg = make_cfg(max_train_steps=6)
    result = train(cfg, StopAt2(), components=build_tiny_components("sd1"))
    assert result.stopped
    from lora_trainer.data.dataset import scan_images

    records, _ = scan_images(cfg)
    good = dataset_hash(records)
    assert load_state(Path(cfg.output_dir), cfg, good).position.step == 2
    with pytest.raises(ResumeError, match=r"other settings: lora_rank \(4 → 8\)"):
        load_state(Path(cfg.output_dir), cfg.replace(lora_rank=8), good)
    with pytest.raises(ResumeError, match="other images or captions"):
        load_state(Path(cfg.output_dir), cfg, "0" * 40)
    with pytest.raises(ResumeError, match="holds no training state"):
        load_state(tmp_path / "empty", cfg, good)
    resumed = train(cfg, Callbacks(), components=build_tiny_components("sd1"), resume=cfg.output_dir)
    assert resumed.steps == 6 and resumed.lora_path.is_file()
