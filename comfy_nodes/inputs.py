"""Node inputs built from the config's own fields, so the node and the config never disagree.

`config_input("lora_rank", min=1, max=256)` gives ComfyUI's ("INT", {...}) tuple with the field's
default and its help text as the tooltip; a node may override the default (steps, say), and where
the node narrows a field (steps ≥ 1, a file name that must be given) it says what the node does
with `help=`, because the config's help would then describe what the node refuses.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, Optional, Tuple

from ..lora_trainer.config import field_help
from ..lora_trainer.errors import LoraTrainerError, in_field_words

_KINDS = {"int": "INT", "float": "FLOAT", "bool": "BOOLEAN", "str": "STRING"}


def config_input(field: str, help: Optional[str] = None, **options: Any) -> Tuple[str, Dict[str, Any]]:
    info = field_help()[field]
    kind = _KINDS[info["type"]]
    spec: Dict[str, Any] = {"default": info["default"], "tooltip": f"{help or info['help']} (config key: {field})"}
    spec.update(options)
    return kind, spec


def tooltip(field: str) -> str:
    return str(field_help()[field]["help"])


# The config keys the nodes show under their own input names: a message says "dataset_path not found",
# the name on the node, not "train_data_dir" (the CLI keeps the config keys).
TRAIN_FIELDS = {"train_data_dir": "dataset_path", "output_name": "lora_name", "lora_rank": "rank",
                "lora_alpha": "alpha", "max_train_steps": "steps", "base_model": "ckpt_name"}
FOLDER_FIELDS = {"train_data_dir": "folder", "trigger_word": "trigger_word"}


@contextlib.contextmanager
def node_words(fields: Dict[str, str]) -> Iterator[None]:
    """The core's errors, re-raised as they are but with the node's input names in place of config keys."""
    try:
        yield
    except LoraTrainerError as e:
        e.args = (in_field_words(str(e), fields),)
        raise
