"""The Train LoRA tab's wiring for AUTOMATIC1111 / Forge (the only script file: A1111 runs every .py here).

The glue is in the `lora_trainer_a1111` package next to this file; the trainer is `lora_trainer/`
at the extension's root, put on sys.path here.
"""

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
for _p in (str(_ROOT), str(_ROOT / "scripts")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from lora_trainer_a1111 import api  # noqa: E402
from lora_trainer_a1111.host import A1111Backend  # noqa: E402
from modules import script_callbacks, shared  # noqa: E402

_backend = A1111Backend()


def on_ui_tabs():
    from lora_trainer.ui import build_blocks

    return [(build_blocks(_backend), "Train LoRA", "lora_trainer")]


def on_ui_settings():
    section = ("lora_trainer", "LoRA Trainer")
    shared.opts.add_option("lora_trainer_output_dir", shared.OptionInfo(
        "", "Folder for training runs (checkpoints, samples); empty: outputs/lora_trainer", section=section))


def on_app_started(_demo, app):
    api.mount(app, _backend, getattr(shared.cmd_opts, "api_auth", None))


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_app_started(on_app_started)
