"""The Train LoRA tab: `session` (no gradio: form → config, the run), `dataset_panel` and `uploads` (no gradio: Load
with the dataset doctor, Caption, Add images), `strengths` (no gradio: Test, its scores and the best strength written),
`merging` (Merge into checkpoint; gradio only handed in), `queue_panel` (Queue: the run queue in this process and its
table; gradio only handed in), `blocks` (the gradio Blocks), `standalone`
(`python -m lora_trainer ui`).

Importing this package does not import gradio; `build_blocks` does.
"""

from .blocks import Backend, build_blocks, start_run
from .dataset_panel import read_rows
from .session import (LOW_VRAM, PRESET_FIELDS, PRESETS, TEST_STRENGTHS, TrainSession, advanced_fields, form_to_config,
                      preset_values, safe_lora_name)
from .standalone import StandaloneBackend, serve

__all__ = ["Backend", "build_blocks", "read_rows", "start_run", "LOW_VRAM", "PRESET_FIELDS", "PRESETS", "TEST_STRENGTHS", "TrainSession",
           "advanced_fields", "form_to_config", "preset_values", "safe_lora_name", "StandaloneBackend", "serve"]
