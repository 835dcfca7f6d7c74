"""Atomic writes: a file is either the old one or the complete new one, never half written.

Every file the core writes (captions, LoRAs, state, sidecars) goes through here.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Callable, Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]


@contextlib.contextmanager
def atomic_path(target: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it is renamed onto `target`.

    The temporary file lives in the same folder so the rename stays on one filesystem
    (atomic on POSIX and Windows). On any error the temporary file is removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _new_temp_file(target)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:  # make the bytes durable before they become visible
            os.fsync(fh.fileno())
        usual_mode(tmp_path)  # a writer may have replaced our temp file by a private one (safetensors does)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _new_temp_file(target: Path) -> Path:
    """An empty, new file beside `target`, created with the usual 0666 & ~umask mode (mkstemp's is 0600,
    which would leave a published LoRA unreadable to a WebUI running as another user)."""
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue


def _umask() -> int:
    """The process's umask, read without changing it (os.umask sets it, racing other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def usual_mode(path: PathLike) -> None:
    """Give a file 0666, a folder 0777 (and its files 0666), less the umask: what `open()` and `mkdir`
    give, so that a WebUI or ComfyUI running as another user can read what we publish."""
    path, mask = Path(path), _umask()
    if path.is_dir():
        os.chmod(path, 0o777 & ~mask)
        for child in path.iterdir():
            if child.is_file():
                os.chmod(child, 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def atomic_write_bytes(target: PathLike, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def atomic_write_text(target: PathLike, text: str) -> Path:
    return atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_with(target: PathLike, writer: Callable[[Path], None]) -> Path:
    """Run `writer(tmp_path)` (e.g. safetensors' save_file) and publish the result atomically."""
    with atomic_path(target) as tmp:
        writer(tmp)
    return Path(target)


def unused_path(path: PathLike) -> Path:
    """`path` if nothing is there, else `name-v2.ext`, `name-v3.ext`, ...: never overwrite."""
    path = Path(path)
    if not path.exists():
        return path
    n = 2
    while True:
        candidate = path.with_name(f"{path.stem}-v{n}{path.suffix}")
        if not candidate.exists():
            return candidate
        n += 1
