"""A `.safetensors` checkpoint read tensor by tensor, never whole.

`safetensors.torch.load_file` materialises every tensor before the first one is converted, and a
memory map keeps each page it touched resident until it is closed: both count against the host
process's memory while the training copy is built. Here each tensor is read with `readinto` straight
into its own memory, or, when it is wanted in another dtype, through a 4 MB buffer converted as it
goes; the file's bytes live only in the OS page cache, which the kernel gives back by itself. Peak
while loading: the training copy plus 4 MB.

The format (8-byte little-endian header size, a JSON header of dtype/shape/data_offsets, then the
data) is the one the `safetensors` package writes; its own reader checks the same things.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..errors import ModelError

if TYPE_CHECKING:
    import torch

_MAX_HEADER = 100 << 20  # the safetensors package refuses larger headers too
_CHUNK = 4 << 20  # bytes read at a time when converting: small enough to stay in the CPU's cache


def safetensors_dtypes() -> dict:
    """safetensors dtype names (F32, BF16, …) → torch dtypes, those this torch has."""
    import torch

    table = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
    for name, attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
        if hasattr(torch, attr):
            table[name] = getattr(torch, attr)
    return table


class CheckpointFile(MutableMapping):
    """The tensors of a `.safetensors` file as a mapping; a tensor is read from disk when it is asked for.

    Removing a key (`del`, `pop`) forgets it without reading. `cast_to` sets the dtype floating-point
    tensors are converted to as they are read, so a half-precision file never exists in float32 twice.
    """

    def __init__(self, path: Path, cast_to: Optional[torch.dtype] = None) -> None:
        self.path = Path(path)
        self.cast_to = cast_to
        size = self.path.stat().st_size
        try:
            with open(self.path, "rb") as fh:
                (header_size,) = struct.unpack("<Q", fh.read(8))
                if not 2 <= header_size <= min(_MAX_HEADER, size - 8):
                    raise ValueError(f"header size {header_size} does not fit a file of {size} bytes")
                header = json.loads(fh.read(header_size))
        except (OSError, ValueError, struct.error) as err:
            raise ModelError(f"Cannot read {self.path}: {err}. The file is damaged or incomplete; download it "
                             "again.") from err
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_size
        known = safetensors_dtypes()
        for key, entry in header.items():
            start, end = entry.get("data_offsets", (0, -1))
            if entry.get("dtype") not in known or not 0 <= start <= end or self._data_start + end > size:
                raise ModelError(f"Cannot read {self.path}: tensor {key!r} is damaged or cut off (the file is "
                                 f"{size} bytes). Download the file again.")
        self._entries = header
        self._names = {key: key for key in header}  # our key → the file's key (after renames)
        self._buffer: Optional[torch.Tensor] = None

    def shape(self, key: str) -> tuple:
        return tuple(self._entries[self._names[key]]["shape"])

    def stored_dtype(self, key: str) -> str:
        """The dtype the file stores `key` in, as safetensors spells it (`F16`, `BF16`, ...)."""
        return self._entries[self._names[key]]["dtype"]

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.read(key, self.cast_to)

    def read(self, key: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The tensor `key`, a floating-point one converted to `dtype` (when given) as it is read."""
        import torch

        entry = self._entries[self._names[key]]
        start, end = entry["data_offsets"]
        stored = safetensors_dtypes()[entry["dtype"]]
        target = dtype if dtype is not None and stored.is_floating_point else stored
        tensor = torch.empty(entry["shape"], dtype=target)
        with open(self.path, "rb") as fh:
            fh.seek(self._data_start + start)
            if target == stored:  # straight into the tensor's own memory
                done = fh.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy())) if end > start else 0
            else:  # through a small buffer that stays in cache, converted as it goes
                done = self._read_cast(fh, tensor.view(-1), stored, end - start)
        if done != end - start:
            raise ModelError(f"Cannot read {self.path}: tensor {key!r} is cut off. Download the file again.")
        return tensor

    def _read_cast(self, fh, out: torch.Tensor, stored: torch.dtype, nbytes: int) -> int:
        import torch

        size = torch.empty((), dtype=stored).element_size()
        if self._buffer is None:  # one buffer for the whole file: no allocation churn between tensors
            self._buffer = torch.empty(_CHUNK, dtype=torch.uint8)
        buffer = self._buffer
        view = memoryview(buffer.numpy())
        done = 0
        while done < nbytes:
            n = fh.readinto(view[: min(_CHUNK, nbytes - done)])
            if not n:
                break
            out[done // size:(done + n) // size].copy_(buffer[:n].view(stored))
            done += n
        return done

    def __setitem__(self, key: str, value: object) -> None:
        raise TypeError("a CheckpointFile is read-only; copy what you need into a dict")

    def __delitem__(self, key: str) -> None:
        del self._names[key]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._names))

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, key: object) -> bool:
        return key in self._names

    def rename(self, new_name: Callable[[str], str]) -> CheckpointFile:
        """Give every key a new name (nothing is read)."""
        self._names = {new_name(key): name for key, name in self._names.items()}
        return self
