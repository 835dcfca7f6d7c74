"""Giving memory back when a run ends, so that a host process does not grow from run to run.

Dropping the last reference to a tensor frees it, but not always back to the operating system:
glibc's malloc keeps freed heap pages for reuse (large tensors freed by a worker thread stay in
that thread's arena), and CUDA's caching allocator keeps freed blocks. A WebUI that trains three
times in one session then holds three runs' worth of freed memory. `release()` collects reference
cycles, hands CUDA's cached blocks back and asks malloc to return its free pages (`malloc_trim`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
import traceback
from functools import lru_cache
from typing import Any, Callable, Optional


def release(cuda: bool = True, collect: bool = True) -> None:
    """Collect garbage, empty CUDA's cache and trim malloc's free pages (each where it applies)."""
    if collect:
        gc.collect()
    if cuda:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@lru_cache(maxsize=1)
def _malloc_trim() -> Optional[Callable[[int], int]]:
    """glibc's malloc_trim, or None (macOS, Windows, musl: their allocators return memory by themselves)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def forget_frames(err: BaseException) -> None:
    """Clear the local variables of the finished frames in `err`'s traceback (and its causes'): a front end that
    keeps the error (to show it, or in a log handler) must not keep the run's models and activations alive."""
    seen = set()
    current: Any = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        current = current.__cause__ or current.__context__
