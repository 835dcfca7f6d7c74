"""Model hashes for LoRA metadata: sha256 of a file's bytes, or a fingerprint of weights in memory."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ..files import atomic_write_text
from .tokenizers import cache_root

if TYPE_CHECKING:
    import torch

_CHUNK = 1 << 20
_SAMPLE = 16  # values per tensor that enter a fingerprint


def file_sha256(path: Path) -> str:
    """sha256 hex of the file, remembered per (path, size, mtime) so a 7 GB checkpoint is read once."""
    path = Path(path).resolve()
    stat = path.stat()
    stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
    cache_file = cache_root() / "hashes.json"
    cache = _read_cache(cache_file)
    entry = cache.get(str(path))
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(block)
    value = digest.hexdigest()
    cache = _read_cache(cache_file)  # re-read: another process may have added entries meanwhile
    cache[str(path)] = {"stamp": stamp, "sha256": value}
    try:
        atomic_write_text(cache_file, json.dumps(cache, indent=1))
    except OSError:  # a read-only home must not stop training
        pass
    return value


def _read_cache(cache_file: Path) -> dict:
    try:
        data = json.loads(cache_file.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def state_dict_fingerprint(state_dicts: Iterable[Mapping[str, torch.Tensor]]) -> str:
    """sha256 over sorted key names, shapes and a strided sample of each tensor's values.

    Cheap (no full pass over GBs of weights) and stable across dtype and device, so the same
    weights held in fp16 on a GPU and in fp32 on the CPU give the same fingerprint.
    """
    import torch

    digest = hashlib.sha256()
    for sd in state_dicts:
        for key in sorted(sd):
            t = sd[key]
            digest.update(f"{key}:{tuple(t.shape)};".encode())
            if t.numel() and t.device.type != "meta":
                flat = t.detach().reshape(-1)
                step = max(1, flat.numel() // _SAMPLE)
                sample = flat[::step][:_SAMPLE].to(device="cpu", dtype=torch.float16).to(torch.float32)
                digest.update(sample.numpy().tobytes())
    return digest.hexdigest()
