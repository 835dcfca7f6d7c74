"""The Train LoRA tab: `session` (no gradio), `blocks` (the gradio Blocks), `standalone` (`python -m lora_trainer ui`).

Importing this package does not import gradio; `build_blocks` does.
"""

from .blocks import Backend, build_blocks, read_rows, start_run
from .session import (LOW_VRAM, PRESET_FIELDS, PRESETS, TEST_STRENGTHS, TrainSession, advanced_fields, form_to_config,
                      preset_values, safe_lora_name)
from .standalone import StandaloneBackend, serve

__all__ = ["Backend", "build_blocks", "read_rows", "start_run", "LOW_VRAM", "PRESET_FIELDS", "PRESETS", "TEST_STRENGTHS", "TrainSession",
           "advanced_fields", "form_to_config", "preset_values", "safe_lora_name", "StandaloneBackend", "serve"]
