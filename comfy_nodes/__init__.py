"""ComfyUI nodes of lora-scripts: Caption Folder → Check Dataset → Train LoRA (or Train Flux LoRA) → LoRA Strength Grid
or Compare LoRAs.

Classic (V1) node classes: ComfyUI 0.8.0 loads them as it loads every older pack, forks and tools
read NODE_CLASS_MAPPINGS, and they are plain classes that tests call without ComfyUI. The V3
`comfy_api` is still marked unstable (`STABLE = False`). Nothing here imports ComfyUI at import time.
"""

from .caption_node import CaptionFolder
from .compare_node import CompareLoRAs
from .dataset_node import CheckDataset
from .flux_node import TrainFluxLoRA
from .grid_node import LoRAStrengthGrid
from .train_node import TrainLoRA

NODE_CLASS_MAPPINGS = {
    "LoraTrainerCaptionFolder": CaptionFolder,
    "LoraTrainerCheckDataset": CheckDataset,
    "LoraTrainerTrain": TrainLoRA,
    "LoraTrainerTrainFlux": TrainFluxLoRA,
    "LoraTrainerStrengthGrid": LoRAStrengthGrid,
    "LoraTrainerCompare": CompareLoRAs,
}
# The pack's name in every display name: ComfyUI has its own "Train LoRA" node, and search shows both.
# The class names (the keys) stay as they are: saved workflows refer to them.
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoraTrainerCaptionFolder": "Caption Folder (lora-scripts)",
    "LoraTrainerCheckDataset": "Check Dataset (lora-scripts)",
    "LoraTrainerTrain": "Train LoRA (lora-scripts)",
    "LoraTrainerTrainFlux": "Train Flux LoRA (lora-scripts)",
    "LoraTrainerStrengthGrid": "LoRA Strength Grid (lora-scripts)",
    "LoraTrainerCompare": "Compare LoRAs (lora-scripts)",
}
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
