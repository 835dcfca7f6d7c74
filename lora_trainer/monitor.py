"""Loss curves where people look for them: TensorBoard event files and a JSON-lines log.

Both live under `output_dir/logs`: `tensorboard --logdir output_dir/logs` shows loss, learning
rate, step time, val_loss and the sample grids; `train.jsonl` is one JSON object per event for
scripts (`{"event": "validation", "step": …, "val_loss": …}` for the validation loss).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from .callbacks import Callbacks


class JsonlLogger(Callbacks):
    def __init__(self, log_dir: Path) -> None:
        self.path = Path(log_dir) / "train.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")  # append: a resumed run continues the same log

    def _write(self, **event: Any) -> None:
        self._fh.write(json.dumps({"time": round(time.time(), 3), **event}) + "\n")
        self._fh.flush()

    def on_loss(self, step: int, loss: float, lr: float) -> None:
        self._write(event="loss", step=step, loss=loss, lr=lr)

    def on_saved(self, path: Path, final: bool) -> None:
        self._write(event="saved", path=str(path), final=final)

    def on_validation(self, step: int, val_loss: float) -> None:
        self._write(event="validation", step=step, val_loss=val_loss)

    def on_sample(self, step: int, path: Path, image: Any = None) -> None:
        self._write(event="sample", step=step, path=str(path))

    def close(self) -> None:
        self._fh.close()


class TensorBoardLogger(Callbacks):
    """Scalars loss / lr / step_time / val_loss and the sample grids, as real TensorBoard event files."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(log_dir=str(log_dir))
        self._last: Optional[float] = None

    def on_loss(self, step: int, loss: float, lr: float) -> None:
        now = time.perf_counter()
        self.writer.add_scalar("loss", loss, step)
        self.writer.add_scalar("lr", lr, step)
        if self._last is not None:
            self.writer.add_scalar("step_time", now - self._last, step)
        self._last = now

    def on_validation(self, step: int, val_loss: float) -> None:
        self.writer.add_scalar("val_loss", val_loss, step)

    def on_sample(self, step: int, path: Path, image: Any = None) -> None:
        if image is not None:
            import numpy as np

            self.writer.add_image("samples", np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def on_saved(self, path: Path, final: bool) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def log_callbacks(output_dir: Path, status: Optional[Callbacks] = None) -> list:
    """The loggers `train()` attaches to every run: JSON lines always, TensorBoard when installed."""
    log_dir = Path(output_dir) / "logs"
    loggers: list = [JsonlLogger(log_dir)]
    try:
        loggers.append(TensorBoardLogger(log_dir))
    except ImportError:
        if status is not None:
            status.on_status("tensorboard is not installed: the loss is logged to logs/train.jsonl only")
    return loggers
