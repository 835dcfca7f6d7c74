"""Training in a terminal: a tqdm bar with the loss, status lines above it, Ctrl-C as a graceful stop.

Shared by `python -m lora_trainer train` (cli.py) and the demo (demo.py).
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Optional

from ..callbacks import Callbacks


class ConsoleCallbacks(Callbacks):
    """A tqdm bar with the loss, status lines above it, and Ctrl-C as a graceful stop."""

    def __init__(self, unit: str = "step", quiet: bool = False) -> None:
        self.unit = unit
        self.quiet = quiet  # a torchrun process other than rank 0: rank 0 shows the run
        self.bar = None
        self.stop_requested = False

    def on_progress(self, step: int, total: int) -> None:
        from tqdm import tqdm

        if self.quiet or total <= 0:  # nothing to count (an empty folder): no empty bar
            return
        if self.bar is None:
            self.bar = tqdm(total=total, initial=step, unit=self.unit, dynamic_ncols=True)
        self.bar.n = step
        self.bar.refresh()

    def on_status(self, message: str) -> None:
        if message and not self.quiet:
            (self.bar.write if self.bar is not None else print)(message)

    def on_loss(self, step: int, loss: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)

    def on_saved(self, path: Path, final: bool) -> None:
        if not final:  # the finished LoRA is named once, by the command's last line ("LoRA: ...")
            self.on_status(f"checkpoint saved: {path}")

    def on_sample(self, step: int, path: Path, image=None) -> None:
        self.on_status(f"samples: {path}")

    def should_stop(self) -> bool:
        return self.stop_requested

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_training(cfg, resume: Optional[str] = None, components=None, quiet: bool = False,
                 also: Optional[Callbacks] = None):
    """Train with the console bar and Ctrl-C handling (shared by `train`, `demo` and the queue); `also` hears
    the run too (the queue's progress)."""
    from ..callbacks import MultiCallbacks
    from ..training.loop import train

    console = ConsoleCallbacks(quiet=quiet)
    previous = signal.getsignal(signal.SIGINT)

    def on_interrupt(signum, frame):
        if console.stop_requested:
            raise KeyboardInterrupt
        console.stop_requested = True
        console.on_status("stopping after this step (Ctrl-C again to abort)…")

    signal.signal(signal.SIGINT, on_interrupt)
    try:
        return train(cfg, MultiCallbacks(console, also), resume=resume, components=components)
    finally:
        signal.signal(signal.SIGINT, previous)
        console.close()
