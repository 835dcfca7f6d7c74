"""Install what the trainer needs into a WebUI's (or ComfyUI's) Python, changing nothing the host already has.

A1111 runs this file at start-up (with its `launch` module); ComfyUI-Manager runs it as a plain
script. Either way the host's installed distributions become pip constraints, so pip may only
add packages, never move one; torch, torchvision, xformers and bitsandbytes are never installed.
The caps below keep diffusers/peft at releases that import on A1111 1.10's transformers 4.30 /
accelerate 0.21 (newer ones need transformers.Cache, accelerate's clear_device_cache, ...).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Dict, Iterable, List, Optional

ROOT = Path(__file__).resolve().parent
NEVER = {"torch", "torchvision", "xformers", "bitsandbytes"}
CAPS = ["peft<0.14", "diffusers<0.37"]
IMPORT_CHECK = "import lora_trainer.training.loop, lora_trainer.adapters.export, lora_trainer.evaluate.sample"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(dists: Optional[Iterable] = None) -> Dict[str, str]:
    """Canonical name → version of everything installed in this Python."""
    out = {}
    for d in dists if dists is not None else metadata.distributions():
        name = d.metadata["Name"]
        if name:
            out.setdefault(canonical(name), d.version)
    return out


def requirements(path: Path = ROOT / "requirements.txt") -> List[str]:
    """The runtime requirements, minus the packages a host owns."""
    reqs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line and canonical(re.split(r"[<>=!~\[; ]", line, 1)[0]) not in NEVER:
            reqs.append(line)
    return reqs


def plan(have: Dict[str, str], reqs: List[str]) -> "tuple[List[str], List[str]]":
    """(requirements to install: only missing ones, constraint lines: every installed version pinned + caps)."""
    missing = [r for r in reqs if canonical(re.split(r"[<>=!~\[; ]", r, 1)[0]) not in have]
    constraints = [f"{name}=={version}" for name, version in sorted(have.items())] + CAPS
    return missing, constraints


def _pip(args: List[str]) -> None:
    try:
        import launch  # A1111 / Forge: their pip (a shell command line), their index and log
    except ImportError:  # ComfyUI-Manager, or by hand
        subprocess.check_call([sys.executable, "-m", "pip", *args])
        return
    launch.run_pip(" ".join(f'"{a}"' for a in args), "lora-scripts requirements")


def verify() -> Optional[str]:
    """None when the trainer imports in a fresh interpreter, else its error (last lines)."""
    r = subprocess.run([sys.executable, "-c", IMPORT_CHECK], cwd=str(ROOT), capture_output=True, text=True)
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["unknown error"])[-1]


def main() -> int:
    missing, constraints = plan(installed(), requirements())
    if missing:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write("\n".join(constraints) + "\n")
        print(f"[lora-scripts] installing {', '.join(missing)} (installed packages kept at their versions)")
        _pip(["install", "-c", f.name, *missing])
        Path(f.name).unlink(missing_ok=True)
    problem = verify()
    if problem:
        print(f"[lora-scripts] the trainer does not import in this environment: {problem}\n"
              "[lora-scripts] please report it with your WebUI version; nothing of the host was changed.")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
