"""LoRA Strength Grid: the same prompt and seed at several LoRA strengths, through ComfyUI's own sampler.

The LoRA is applied with `comfy.sd.load_lora_for_models` (what LoraLoader does) and sampled with
`nodes.common_ksampler` (what KSampler does), so the grid shows what users will get. With the
training images connected (`reference_dir`) and the captioner's CoCa weights on the machine, each
strength is scored as `python -m lora_trainer score` does (lora_trainer.evaluate.score), against the base
model rendered from the same seed.
"""

from __future__ import annotations

from typing import Any, List, Optional

from ..lora_trainer.data.captions import DEFAULT_MODEL, MissingWeights
from ..lora_trainer.config import field_help
from ..lora_trainer.errors import ConfigError, DatasetError, in_field_words
from ..lora_trainer.evaluate.sample import parse_strengths
from ..lora_trainer.evaluate.score import StrengthScorer, check_weights, rank_strengths, read_trigger, with_base
from .caption_node import AUTO, pretrained_for, weight_choices, weights_folder
from .host import ComfyHost, load_lora_file
from .images import image_to_pil, labelled_grid

SCORE_MODEL = DEFAULT_MODEL  # the captioner's CoCa: its CLIP half scores (the same weights file)
FROM_INPUT = "(from input)"  # a value the widget always has, even with models/loras empty


class LoRAStrengthGrid:
    DESCRIPTION = ("Render one prompt at several LoRA strengths with the same seed, side by side with labels, and "
                   "score each strength with CLIP (the captioner's CoCa weights) against the training images.")
    CATEGORY = "LoRA Trainer"
    FUNCTION = "grid"
    RETURN_TYPES = ("IMAGE", "STRING", "FLOAT")
    RETURN_NAMES = ("grid", "scores", "best_strength")
    OUTPUT_TOOLTIPS = ("One image per strength, labelled, in one row.",
                       "Style, fidelity and combined score per strength (or why scoring was skipped).",
                       "The best strength by the scores (the lowest strength asked when scoring was skipped).")

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
                "reference_dir": ("STRING", {"forceInput": True, "tooltip": "The training images (connect Check "
                                  "Dataset's or Caption Folder's dataset_path): style is measured against them. "
                                  "Not connected: no scoring."}),
                "clip_weights": (weight_choices(), {"default": AUTO, "tooltip": "The CoCa weights that score "
                                 "(the captioner's; models/lora_trainer/captioner/). (auto): the default weights "
                                 "from the caches."}),
            },
        }

    def grid(self, model: Any, clip: Any, vae: Any, prompt: str, negative: str, strengths: str, seed: int,
             steps: int, cfg: float, width: int, height: int, lora_name: str = "", trained_lora: str = "",
             reference_dir: str = "", clip_weights: str = AUTO) -> dict:
        import folder_paths
        import nodes

        values = parse_strengths(strengths)
        lora_name = trained_lora or ("" if lora_name == FROM_INPUT else lora_name)
        if not lora_name:
            raise ConfigError("Pick a lora_name, or connect Train LoRA's lora_name output to trained_lora.")
        lora_path = folder_paths.get_full_path_or_raise("loras", lora_name)
        lora = load_lora_file(lora_path)
        latent = nodes.EmptyLatentImage().generate(width, height, 1)[0]
        rendered = with_base(values) if reference_dir else values  # the base is the fidelity reference
        images = {s: image_to_pil(render(model, clip, vae, lora, s, prompt, negative, seed, steps, cfg, latent))
                  for s in rendered}
        text, best = score_strengths(images, values, prompt, reference_dir, clip_weights, lora_path)
        grid = labelled_grid([images[s] for s in values], [f"{lora_name.rsplit('.', 1)[0]} {s:g}" for s in values])
        return {"ui": {"text": [text]}, "result": (grid, text, best)}


def score_strengths(images: dict, asked: List[float], prompt: str, reference_dir: str, weights: str,
                    lora_path: str) -> tuple:
    """(the scores as text, the best strength): the core's rule (lora_trainer.evaluate.score) on the rendered pictures.
    Without a reference folder or the CoCa weights: why scoring was skipped, and the lowest strength asked."""
    if not reference_dir:
        return "scoring skipped: connect reference_dir (the training images) to score the strengths", min(asked)
    try:
        check_weights(SCORE_MODEL, pretrained_for(weights))
    except MissingWeights as e:
        return f"scoring skipped: {e.in_words(weights_folder(), field='clip_weights')}", min(asked)
    ComfyHost().free_gpu()  # CoCa needs the memory ComfyUI's models hold; they load back when next needed
    strengths = list(images)
    try:
        with StrengthScorer(reference_dir, SCORE_MODEL, pretrained_for(weights)) as scorer:
            scores = scorer.score_images([[images[s] for s in strengths]], strengths, [prompt],
                                         read_trigger(lora_path))
    except DatasetError as e:
        return f"scoring skipped: {in_field_words(str(e), {'train_data_dir': 'reference_dir'})}", min(asked)
    report = rank_strengths(scores, asked)
    return report.table(), report.best


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
