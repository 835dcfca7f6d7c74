"""How the core reports to whoever runs it: the CLI, A1111, ComfyUI or a test.

The core never imports a host. A front end passes a `Callbacks` subclass (or instance with
overridden methods); every method has a no-op default so a front end implements only what it
shows. `HostInterface` is the other direction: what the core may ask of the host.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional


class Callbacks:
    """Progress and control hooks called from the training and captioning loops."""

    def on_progress(self, step: int, total: int) -> None:
        """`step` of `total` units of work are done (optimizer steps, or images captioned)."""

    def on_status(self, message: str) -> None:
        """A one-line human-readable status ("caching latents 3/20", "saved ...")."""

    def on_loss(self, step: int, loss: float, lr: float) -> None:
        """The loss of one optimizer step, averaged over its accumulation micro-batches."""

    def on_validation(self, step: int, val_loss: float) -> None:
        """The validation loss after `step` (validation_split / validation_dir): at each save and at the end."""

    def on_sample(self, step: int, path: Path, image: Any = None) -> None:
        """A sample grid was written to `path` (`image` is the PIL image when available)."""

    def on_saved(self, path: Path, final: bool) -> None:
        """A LoRA file was written: a checkpoint (`final=False`) or the finished LoRA."""

    def should_stop(self) -> bool:
        """Polled once per micro-batch: return True to stop after saving a resumable state."""
        return False


class HostInterface:
    """What a host lends the core. The defaults describe the standalone CLI."""

    def lora_dir(self) -> Optional[Path]:
        """Where finished LoRAs should also be placed, or None to keep them in output_dir."""
        return None

    def free_gpu(self) -> None:
        """Move the host's own models off the GPU before training starts."""

    def restore_gpu(self) -> None:
        """Put the host's models back once training has ended, whatever the outcome."""

    def refresh_loras(self) -> None:
        """Make the host's LoRA list show newly written files."""


class MultiCallbacks(Callbacks):
    """Fan one event out to several callbacks (a front end's plus the log writers)."""

    def __init__(self, *callbacks: Callbacks) -> None:
        self.callbacks = [c for c in callbacks if c is not None]

    def on_progress(self, step: int, total: int) -> None:
        for c in self.callbacks:
            c.on_progress(step, total)

    def on_status(self, message: str) -> None:
        for c in self.callbacks:
            c.on_status(message)

    def on_loss(self, step: int, loss: float, lr: float) -> None:
        for c in self.callbacks:
            c.on_loss(step, loss, lr)

    def on_validation(self, step: int, val_loss: float) -> None:
        for c in self.callbacks:
            c.on_validation(step, val_loss)

    def on_sample(self, step: int, path: Path, image: Any = None) -> None:
        for c in self.callbacks:
            c.on_sample(step, path, image)

    def on_saved(self, path: Path, final: bool) -> None:
        for c in self.callbacks:
            c.on_saved(path, final)

    def should_stop(self) -> bool:
        return any(c.should_stop() for c in self.callbacks)
