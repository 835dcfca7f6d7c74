"""Check that the current interpreter + PYTHONPATH is the stack it claims to be.

    python .ci/check_stack.py newest|a1111|forge

For a host stack, every package pinned in .ci/<stack>.txt must be found at exactly
that version and be imported from .ci/envs/<stack>/ (not from .venv behind it).
Then the modules the trainer core builds on must import, numpy must interoperate
with torch, and one line of versions is printed. Exit status 1 on any failure.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# distribution name -> top-level module, where they differ
MODULE_OF = {
    "pillow": "PIL",
    "huggingface-hub": "huggingface_hub",
    "open-clip-torch": "open_clip",
    "protobuf": "google.protobuf",
    "pyyaml": "yaml",
}

SHOWN = [
    ("torch", "torch"),
    ("torchvision", "torchvision"),
    ("numpy", "numpy"),
    ("transformers", "transformers"),
    ("tokenizers", "tokenizers"),
    ("diffusers", "diffusers"),
    ("peft", "peft"),
    ("huggingface_hub", "huggingface_hub"),
    ("safetensors", "safetensors"),
    ("accelerate", "accelerate"),
    ("open_clip", "open_clip_torch"),
    ("PIL", "pillow"),
]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if not m:
            raise SystemExit(f"{path}: cannot read pin {line!r} (only name==version lines)")
        pins[norm(m.group(1))] = m.group(2)
    return pins


def main(argv: list[str]) -> int:
    stack = argv[1] if len(argv) > 1 else "newest"
    errors: list[str] = []

    if stack != "newest":
        overlay = (ROOT / ".ci" / "envs" / stack).resolve()
        for dist, version in read_pins(ROOT / ".ci" / f"{stack}.txt").items():
            try:
                got = md.version(dist)
            except md.PackageNotFoundError:
                errors.append(f"{dist}: not installed (pinned {version})")
                continue
            if got != version:
                errors.append(f"{dist}: found {got}, pinned {version}")
            modname = MODULE_OF.get(dist, dist.replace("-", "_"))
            try:
                mod = importlib.import_module(modname)
            except Exception as exc:  # noqa: BLE001 - report every failure, then exit 1
                errors.append(f"{dist}: import {modname} failed: {type(exc).__name__}: {exc}")
                continue
            where = Path(getattr(mod, "__file__", None) or list(mod.__path__)[0]).resolve()
            if overlay not in where.parents:
                errors.append(f"{dist}: {modname} imported from {where}, not from {overlay}")

    checks = [
        "import torch, torchvision, transformers, diffusers, peft, safetensors, numpy, PIL, yaml, tqdm",
        "import accelerate, huggingface_hub, open_clip, tokenizers",
        "from diffusers import UNet2DConditionModel, AutoencoderKL, DDPMScheduler",
        "from transformers import CLIPTextModel, CLIPTokenizer",
        "from peft import LoraConfig",
        "import safetensors.torch",
        # numpy <-> torch both ways (torch 2.x wheels are built against numpy 2 ABI)
        "import numpy as np, torch; a = torch.from_numpy(np.arange(4.0)); assert a.numpy().sum() == 6.0",
        # open_clip ships the CLIP BPE vocabulary the core uses for tokenizers offline
        "import os, open_clip, open_clip.tokenizer as t; assert os.path.isfile(t.default_bpe())",
        "import open_clip; assert open_clip.tokenize('a photo').shape[-1] == 77",
    ]
    for code in checks:
        try:
            exec(code, {})  # noqa: S102 - fixed strings above
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{code!r}: {type(exc).__name__}: {exc}")

    versions = []
    for mod, dist in SHOWN:
        try:
            versions.append(f"{mod} {md.version(dist)}")
        except md.PackageNotFoundError:
            versions.append(f"{mod} -")
    print(f"[stack {stack}] python {sys.version.split()[0]}; " + ", ".join(versions))

    # tensorboard is optional at run time (the core must cope without it); report only.
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401

        print(f"[stack {stack}] tensorboard: ok")
    except Exception as exc:  # noqa: BLE001
        print(f"[stack {stack}] tensorboard: NOT importable here ({type(exc).__name__}: {exc})")

    for e in errors:
        print(f"[stack {stack}] ERROR {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
