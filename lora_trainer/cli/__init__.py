"""The command line front end: `python -m lora_trainer …` (commands), the terminal's progress and Ctrl-C
(console), and the demo that trains a tiny LoRA on drawn images (demo, demo_data)."""

from .commands import main

__all__ = ["main"]
