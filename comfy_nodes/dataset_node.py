"""Check Dataset: the dataset doctor on a folder, before an hour of GPU goes into it.

The same `lora_trainer.data.doctor.examine` as `python -m lora_trainer doctor`: every image and caption
opened once; unreadable, too small, duplicate, uncaptioned images, captions over 75 tokens, ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..lora_trainer.config import load_config
from ..lora_trainer.data.doctor import examine
from .fingerprint import folder_fingerprint
from .host import ComfyCallbacks
from .inputs import FOLDER_FIELDS, node_words, tooltip


class CheckDataset:
    DESCRIPTION = ("Check an image folder before training: unreadable, too small or hard-cropped images, duplicates "
                   "and near duplicates, missing or too long captions, a missing trigger word; with a fix for each.")
    CATEGORY = "LoRA Trainer"
    FUNCTION = "check"
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("dataset_path", "report")
    OUTPUT_TOOLTIPS = ("The folder, to connect to Train LoRA's dataset_path.",
                       "Every finding with its fix, the usable images, the buckets and the steps.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "folder": ("STRING", {"default": "", "tooltip": tooltip("train_data_dir") + " Type a path, or "
                                      "connect Caption Folder's dataset_path."}),
                "trigger_word": ("STRING", {"default": "", "tooltip": "The word every caption should hold "
                                            "(empty: the config file's trigger_word, if any)."}),
            },
            "optional": {
                "config_file": ("STRING", {"default": "", "tooltip": "Optional YAML config: its buckets, resolution "
                                           "and steps are the ones checked against (the same file as Train LoRA's)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, folder: Any = None, config_file: Any = None, **_: Any) -> str:
        return folder_fingerprint(folder, config_file)

    def check(self, folder: str, trigger_word: str, config_file: str = "", unique_id: Optional[str] = None) -> dict:
        callbacks = ComfyCallbacks(unique_id)
        with node_words(FOLDER_FIELDS):
            cfg = load_config(config_file.strip() or None, train_data_dir=folder.strip())
            report = examine(cfg=cfg, trigger=trigger_word.strip() or None,  # the folder as a config key: named
                             on_progress=callbacks.on_progress)                # by the node's input (node_words)
        callbacks.on_status(report.summary())
        text = report.text()
        return {"ui": {"text": [text]}, "result": (str(Path(folder.strip())), text)}
