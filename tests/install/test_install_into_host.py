"""install.py in a real AUTOMATIC1111 1.10 Python environment (A1111's pinned set, .ci/a1111-host.txt), run the
way A1111 runs an extension's installer (its `launch` importable) and the way ComfyUI-Manager does (a plain
`python install.py`): it adds only what is missing, moves no installed package, never installs torch & co.;
the trainer then trains the demo there, and a second run installs nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
A1111_LAUNCH = Path(__file__).resolve().parent / "a1111_launch"  # stand-in for A1111's launch.run_pip
NEVER = {"torch", "torchvision", "xformers", "bitsandbytes"}


def _pip_list(python: Path) -> dict:
    out = subprocess.run([str(python), "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
                         capture_output=True, text=True, check=True).stdout
    return {d["name"].lower().replace("_", "-"): d["version"] for d in json.loads(out)}


def _run_installer(python: Path, mode: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if mode == "a1111":  # A1111 (launch_utils.run_extension_installer) puts its root, with launch.py, here
        env["PYTHONPATH"] = str(A1111_LAUNCH)
    return subprocess.run([str(python), str(ROOT / "install.py")], cwd=cwd, env=env, capture_output=True, text=True)


@pytest.fixture
def host_python(tmp_path) -> Path:
    """A fresh copy of the A1111 environment (install.py changes it)."""
    venv = tmp_path / "venv"
    shutil.copytree(os.environ["LORA_TRAINER_HOST_VENV"], venv, symlinks=True)
    return venv / "bin" / "python"


@pytest.mark.parametrize("mode", ["a1111", "comfyui-manager"])
def test_install_adds_only_what_is_missing(host_python, tmp_path, mode):
    before = _pip_list(host_python)
    assert before["transformers"] == "4.30.2" and before["gradio"] == "3.41.2" and "torch" in before
    assert "diffusers" not in before and "peft" not in before  # a WebUI without the trainer's packages

    first = _run_installer(host_python, mode, tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "installing diffusers" in first.stdout

    after = _pip_list(host_python)
    moved = {name: (version, after.get(name)) for name, version in before.items() if after.get(name) != version}
    assert moved == {}, f"install.py changed the host: {moved}"
    added = set(after) - set(before)
    assert {"diffusers", "peft"} <= added and not added & NEVER

    if mode == "a1111":  # the trainer works there: the demo trains a tiny LoRA end to end
        demo = subprocess.run([str(host_python), "-m", "lora_trainer", "demo", "--output", str(tmp_path / "demo"),
                               "--steps", "2"], cwd=ROOT, capture_output=True, text=True)
        assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
        assert (tmp_path / "demo" / "demo_lora.safetensors").is_file()

    again = _run_installer(host_python, mode, tmp_path)
    assert again.returncode == 0 and "installing" not in again.stdout, again.stdout + again.stderr
    assert _pip_list(host_python) == after
