"""Node inputs built from the config's own fields, so the node and the config never disagree.

`config_input("lora_rank", min=1, max=256)` gives ComfyUI's ("INT", {...}) tuple with the field's
default and its help text as the tooltip; a node may override the default (steps, say), and where
the node narrows a field (steps ≥ 1, a file name that must be given) it says what the node does
with `help=`, because the config's help would then describe what the node refuses.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from ..lora_trainer.config import field_help

_KINDS = {"int": "INT", "float": "FLOAT", "bool": "BOOLEAN", "str": "STRING"}


def config_input(field: str, help: Optional[str] = None, **options: Any) -> Tuple[str, Dict[str, Any]]:
    info = field_help()[field]
    kind = _KINDS[info["type"]]
    spec: Dict[str, Any] = {"default": info["default"], "tooltip": f"{help or info['help']} (config key: {field})"}
    spec.update(options)
    return kind, spec


def tooltip(field: str) -> str:
    return str(field_help()[field]["help"])
