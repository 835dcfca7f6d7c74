"""ComfyUI entry point: ComfyUI imports this folder as a package and reads these mappings.

Only the node classes are imported here (no ComfyUI module, no model, no GPU), so importing the
package outside ComfyUI works. The trainer itself is `lora_trainer/`; see README.md.
"""

from .comfy_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./comfy_nodes/web"  # served as /extensions/<this folder>/; shows results on the nodes

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
