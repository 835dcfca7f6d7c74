"""IS_CHANGED for the nodes that read a folder: re-queueing re-runs them when the folder changed.

ComfyUI caches a node's outputs for identical inputs, so a dataset path that stays the same while
its images or captions change would silently skip training. The fingerprint covers every file's
name, size and modification time, and the full bytes of the caption files (small, hand-edited).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

CAPTION_SUFFIXES = {".txt", ".csv", ".jsonl", ".caption"}


def folder_fingerprint(folder: str, *extra_files: Optional[str]) -> str:
    digest = hashlib.sha256()
    root = Path(folder)
    if root.is_dir():
        for path in sorted(p for p in root.iterdir() if p.is_file()):
            stat = path.stat()
            digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
            if path.suffix.lower() in CAPTION_SUFFIXES:
                digest.update(path.read_bytes())
    else:
        digest.update(f"missing:{folder}".encode())
    for extra in extra_files:
        if extra and os.path.isfile(extra):
            digest.update(Path(extra).read_bytes())
    return digest.hexdigest()
