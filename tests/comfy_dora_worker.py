"""Apply a LoRA file to a single-file SD1 checkpoint with ComfyUI 0.8.0's own code, in a process of its own.

Used by test_dora.py: `python comfy_dora_worker.py CHECKPOINT LORA STRENGTH OUT` with ComfyUI's source and its
overlay on PYTHONPATH. The key map is ComfyUI's (`comfy.lora.model_lora_keys_unet/clip`, the UNet config
detected by `comfy.model_detection.detect_unet_config` from the file), the file is read by `comfy.lora.load_lora`
and each patch computed by its adapter's `calculate_weight` (for DoRA: `comfy/weight_adapter/base.py`
`weight_decompose`). OUT gets {kohya module: patched weight} and `OUT.json` the keys ComfyUI did not load.
"""

import json
import logging
import sys
import types

import comfy.options

comfy.options.enable_args_parsing(False)
import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True  # no GPU here, and none wanted
import comfy.lora  # noqa: E402
import comfy.model_detection  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

UNET, CLIP_L = "model.diffusion_model.", "cond_stage_model.transformer."


class NotLoaded(logging.Handler):
    def __init__(self):
        super().__init__()
        self.keys = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("lora key not loaded: "):
            self.keys.append(message.split(": ", 1)[1])


def stand_in(state_dict, unet_config=None):
    """What the key maps read of a model: its state_dict() (and the UNet's config)."""
    model = types.SimpleNamespace(state_dict=lambda: state_dict)
    if unet_config is not None:
        model.model_config = types.SimpleNamespace(unet_config=unet_config)
    return model


def main(checkpoint, lora_path, strength, out):
    weights = load_file(checkpoint)
    unet = {"diffusion_model." + k[len(UNET):]: v for k, v in weights.items() if k.startswith(UNET)}
    clip = {"clip_l.transformer." + k[len(CLIP_L):]: v for k, v in weights.items() if k.startswith(CLIP_L)}
    key_map = {}
    comfy.lora.model_lora_keys_unet(stand_in(unet, comfy.model_detection.detect_unet_config(weights, UNET)), key_map)
    comfy.lora.model_lora_keys_clip(stand_in(clip), key_map)
    handler = NotLoaded()
    logging.getLogger().addHandler(handler)
    lora = load_file(lora_path)
    patches = comfy.lora.load_lora(lora, key_map)
    model_weights = {**unet, **clip}
    patched = {}
    for name in sorted({k.split(".", 1)[0] for k in lora}):
        model_key = key_map.get(name)
        if model_key in patches:
            weight = model_weights[model_key].float().clone()
            patched[name] = patches[model_key].calculate_weight(weight, model_key, strength, 1.0, None, lambda w: w)
    save_file(patched, out)
    with open(out + ".json", "w", encoding="utf-8") as f:
        json.dump(handler.keys, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4])
