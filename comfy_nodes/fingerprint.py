"""IS_CHANGED for the nodes that read a folder: re-queueing re-runs them when the folder changed.

ComfyUI caches a node's outputs for identical inputs, so a dataset path that stays the same while
its images or captions change would silently skip training. The fingerprint covers every file's
name, size and modification time, and the full bytes of the caption files (small, hand-edited).

ComfyUI calls IS_CHANGED with only the typed values: a linked input arrives as None (its value
does not exist yet). Such an input adds nothing here; ComfyUI's cache key already holds the linked
node's own signature (Caption Folder fingerprints its folder the same way), so the result stays
the same until something upstream changes. An exception here would make ComfyUI run the node on
every Run — for Train LoRA, an hour of GPU per click.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

CAPTION_SUFFIXES = {".txt", ".csv", ".jsonl", ".caption"}


def folder_fingerprint(folder: Any, *extra_files: Any) -> str:
    digest = hashlib.sha256()
    if isinstance(folder, str) and folder.strip():
        root = Path(folder.strip())
        if root.is_dir():
            for path in sorted(p for p in root.iterdir() if p.is_file()):
                stat = path.stat()
                digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
                if path.suffix.lower() in CAPTION_SUFFIXES:
                    digest.update(path.read_bytes())
        else:
            digest.update(f"missing:{folder}".encode())
    else:
        digest.update(b"linked or empty")
    for extra in extra_files:
        if isinstance(extra, str) and extra.strip() and Path(extra.strip()).is_file():
            digest.update(Path(extra.strip()).read_bytes())
    return digest.hexdigest()
