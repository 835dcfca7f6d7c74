"""install.py: only missing packages, every installed version kept, never torch & co; on A1111 1.10's set
pip resolves to releases that import (the a1111 stack runs the whole suite with exactly those)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import install  # noqa: E402


def _dist(name, version):
    return types.SimpleNamespace(metadata={"Name": name}, version=version)


def test_plan_installs_only_missing_and_pins_the_host():
    have = install.installed([_dist("Transformers", "4.30.2"), _dist("torch", "2.1.2+cu121"),
                              _dist("huggingface_hub", "0.36.2"), _dist("Pillow", "9.5.0")])
    reqs = install.requirements()
    assert not any(r.split(">")[0].split("=")[0] in install.NEVER for r in reqs)
    missing, constraints = install.plan(have, reqs)
    names = {m.split(">")[0].split("=")[0].split("<")[0] for m in missing}
    assert {"diffusers", "peft"} <= names and "transformers" not in names and "pillow" not in names
    assert "transformers==4.30.2" in constraints and "huggingface-hub==0.36.2" in constraints
    assert "torch==2.1.2+cu121" in constraints and "peft<0.14" in constraints and "diffusers<0.37" in constraints


def test_main_without_launch_uses_pip_and_verifies(monkeypatch):
    seen = []
    monkeypatch.setattr(install, "installed", lambda: {"transformers": "4.30.2"})
    monkeypatch.setattr(install.subprocess, "check_call", lambda args: seen.append(args))
    monkeypatch.setattr(install, "verify", lambda: None)
    monkeypatch.delitem(sys.modules, "launch", raising=False)
    assert install.main() == 0
    assert seen[0][:4] == [sys.executable, "-m", "pip", "install"] and "-c" in seen[0]
    monkeypatch.setattr(install, "verify", lambda: "ImportError: cannot import name 'Cache'")
    assert install.main() == 1


def test_main_under_a1111_uses_launch_run_pip(monkeypatch):
    seen = []
    monkeypatch.setitem(sys.modules, "launch", types.SimpleNamespace(run_pip=lambda cmd, desc: seen.append(cmd)))
    monkeypatch.setattr(install, "installed", lambda: {})
    monkeypatch.setattr(install, "verify", lambda: None)
    install.main()
    assert seen and seen[0].startswith('"install" "-c"') and '"peft>=0.13"' in seen[0]


@pytest.mark.skipif(os.environ.get("LORA_TRAINER_STACK") != "a1111", reason="runs once, on the a1111 stack")
def test_a1111_set_resolves_without_moving_anything(tmp_path):
    """pip (dry run, PyPI) with A1111 1.10's installed set as constraints: diffusers 0.36 + peft 0.13, nothing moved."""
    have = {k: v for k, v in install.installed().items() if k not in ("diffusers", "peft")}
    missing, constraints = install.plan(have, install.requirements())
    (tmp_path / "c.txt").write_text("\n".join(constraints))
    report = tmp_path / "report.json"
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                           "--report", str(report), "-c", str(tmp_path / "c.txt"), *missing])
    got = {install.canonical(i["metadata"]["name"]): i["metadata"]["version"]
           for i in json.loads(report.read_text())["install"]}
    assert got["diffusers"].startswith("0.36") and got["peft"] == "0.13.2"
    moved = {n: (have[n], v) for n, v in got.items() if n in have and v != have[n]}
    assert not moved
    assert install.verify() is None  # the core imports on this stack
