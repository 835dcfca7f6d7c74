"""Atomic writes: the old file or the whole new one, no temp file left behind, and the usual file mode
(a LoRA written 0600 would be unreadable to a WebUI running as another user)."""

from __future__ import annotations

import os
import stat

import pytest

from lora_trainer.files import atomic_write_text, atomic_write_with, unused_path


def test_published_file_has_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "card.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 and path.read_text() == "{}"


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    target = atomic_write_text(tmp_path / "a.txt", "old")

    def half_written(tmp):
        tmp.write_text("ne")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write_with(target, half_written)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_unused_path_never_overwrites(tmp_path):
    first = tmp_path / "lora.safetensors"
    assert unused_path(first) == first
    first.write_bytes(b"x")
    (tmp_path / "lora-v2.safetensors").write_bytes(b"x")
    assert unused_path(first) == tmp_path / "lora-v3.safetensors"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_safetensors_files_get_the_umask_mode_too(tmp_path, umask, mode):
    """safetensors' save_file replaces the temp file with a private (0600) one; what we publish must not stay so."""
    import torch
    from safetensors.torch import save_file

    from lora_trainer.config import TrainConfig
    from lora_trainer.training.state import Position, save_state

    old = os.umask(umask)
    try:
        path = atomic_write_with(tmp_path / "lora.safetensors",
                                 lambda tmp: save_file({"x": torch.zeros(2)}, str(tmp)))
        state = save_state(tmp_path / "state", Position(step=1), {"x": torch.zeros(2)}, {}, TrainConfig(), "h", 0)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert stat.S_IMODE(state.stat().st_mode) == 0o777 & ~umask
    assert {stat.S_IMODE(p.stat().st_mode) for p in state.iterdir()} == {mode}

