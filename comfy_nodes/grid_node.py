"""LoRA Strength Grid: the same prompt and seed at several LoRA strengths, through ComfyUI's own sampler.

The LoRA is applied with `comfy.sd.load_lora_for_models` (what LoraLoader does) and sampled with
`nodes.common_ksampler` (what KSampler does), so the grid shows what users will get.
"""

from __future__ import annotations

from typing import Any, List, Optional

from ..lora_trainer.config import field_help
from ..lora_trainer.errors import ConfigError
from .host import load_lora_file
from .images import image_to_pil, labelled_grid


FROM_INPUT = "(from input)"  # a value the widget always has, even with models/loras empty


def parse_strengths(text: str) -> List[float]:
    try:
        values = [float(part) for part in text.replace(";", ",").split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"strengths: write numbers separated by commas, e.g. 0.5,0.6,0.7,0.8 (got {text!r}).") \
            from None
    if not values or len(values) > 16:
        raise ConfigError(f"strengths: give 1 to 16 values, e.g. 0.5,0.6,0.7,0.8 (got {text!r}).")
    return values


class LoRAStrengthGrid:
    DESCRIPTION = "Render one prompt at several LoRA strengths with the same seed, side by side with labels."
    CATEGORY = "LoRA Trainer"
    FUNCTION = "grid"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("grid",)
    OUTPUT_TOOLTIPS = ("One image per strength, labelled, in one row.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        import folder_paths

        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The base model (without the LoRA)."}),
                "clip": ("CLIP", {"tooltip": "The base model's CLIP."}),
                "vae": ("VAE", {"tooltip": "Decodes the samples."}),
                "prompt": ("STRING", {"default": "", "multiline": True, "tooltip": "Prompt; put the trigger word in."}),
                "negative": ("STRING", {"default": "", "multiline": True, "tooltip": "Negative prompt."}),
                "strengths": ("STRING", {"default": "0.5,0.6,0.7,0.8", "tooltip":
                              "LoRA strengths, comma-separated (add 0 for a column without the LoRA)."}),
                "seed": ("INT", {"default": 1, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "Same seed for every image."}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 150,
                                  "tooltip": field_help()["sample_steps"]["help"]}),
                "cfg": ("FLOAT", {"default": 7.0, "min": 1.0, "max": 30.0, "step": 0.5,
                                  "tooltip": "Classifier-free guidance scale."}),
                "width": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 8, "tooltip": "Image width."}),
                "height": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 8, "tooltip": "Image height."}),
            },
            "optional": {  # optional: an empty loras folder must not make the graph invalid before training
                "lora_name": ([FROM_INPUT, *folder_paths.get_filename_list("loras")], {
                    "default": FROM_INPUT, "tooltip": f"A LoRA from models/loras; {FROM_INPUT}: the LoRA "
                    "connected to trained_lora."}),
                "trained_lora": ("STRING", {"forceInput": True, "tooltip": "Connect Train LoRA's lora_name output "
                                 "here to test the LoRA just trained (wins over lora_name)."}),
            },
        }

    def grid(self, model: Any, clip: Any, vae: Any, prompt: str, negative: str, strengths: str, seed: int,
             steps: int, cfg: float, width: int, height: int, lora_name: str = "", trained_lora: str = "") -> tuple:
        import folder_paths
        import nodes

        values = parse_strengths(strengths)
        lora_name = trained_lora or ("" if lora_name == FROM_INPUT else lora_name)
        if not lora_name:
            raise ConfigError("Pick a lora_name, or connect Train LoRA's lora_name output to trained_lora.")
        lora = load_lora_file(folder_paths.get_full_path_or_raise("loras", lora_name))
        latent = nodes.EmptyLatentImage().generate(width, height, 1)[0]
        images = [image_to_pil(render(model, clip, vae, lora, s, prompt, negative, seed, steps, cfg, latent))
                  for s in values]
        return (labelled_grid(images, [f"{lora_name.rsplit('.', 1)[0]} {s:g}" for s in values]),)


def render(model: Any, clip: Any, vae: Any, lora: Optional[dict], strength: float, prompt: str, negative: str,
           seed: int, steps: int, cfg: float, latent: dict) -> Any:
    """One image: LoraLoader → CLIPTextEncode ×2 → KSampler (euler, normal) → VAEDecode."""
    import comfy.sd
    import nodes

    if strength:
        model, clip = comfy.sd.load_lora_for_models(model, clip, lora, strength, strength)
    positive = nodes.CLIPTextEncode().encode(clip, prompt)[0]
    negative_cond = nodes.CLIPTextEncode().encode(clip, negative)[0]
    samples = nodes.common_ksampler(model, seed, steps, cfg, "euler", "normal", positive, negative_cond, latent)[0]
    return nodes.VAEDecode().decode(vae, samples)[0]
