"""A LoRA baked into a checkpoint samples, in a real ComfyUI 0.8.0 (CPU), like the base with the LoRA at that strength.

The example graph example_workflows/api/merge_lora_into_checkpoint.json (Load Checkpoint → LoraLoader →
CheckpointSave, ComfyUI's own nodes) is queued through POST /prompt and must write a checkpoint. That file, and
one written by this project's `merge_into_checkpoint` (what the tab's "Merge into checkpoint" and `python -m
lora_trainer merge` write), are then sampled with the same seed as the base with LoraLoader at the same strength
(KSampler, 3 steps, 64 px); the pictures must match within a small tolerance, while the LoRA itself visibly moves
the picture (base alone against base + LoRA).

The LoRA is random, rank 4, on every attention projection of the UNet and the text encoder's self-attention and
MLP of the random-weight SD1.5 the stage uses; its module names come from the base file's own keys (the core's
key map), so every key loads ("lora key not loaded" never appears in ComfyUI's log).
"""

from __future__ import annotations

import copy
import re

import pytest

STRENGTH = 0.7
SEED = 7
API_GRAPH = "api/merge_lora_into_checkpoint.json"
LORA = "ci_random_lora.safetensors"
UNET_TARGETS = re.compile(r"lora_unet_.*_(attn[12]_to_(q|k|v|out_0)|proj_in|proj_out)$")
TE_TARGETS = re.compile(r"lora_te_text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])$")


@pytest.fixture(scope="module")
def random_lora(comfy_base, sd15_checkpoint):
    """A random rank-4 kohya LoRA for the stage's SD1.5, in <base>/models/loras."""
    import torch

    from lora_trainer.adapters.export import save_lora
    from lora_trainer.adapters.merge import module_map
    from lora_trainer.model.checkpoint_file import CheckpointFile
    from lora_trainer.model.shipped import load_configs
    from lora_trainer.model.single_file import select_variant

    base = CheckpointFile(comfy_base / "models" / "checkpoints" / sd15_checkpoint)
    where = module_map(list(base), "sd1", load_configs("sd1", select_variant("sd1", base)))
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for module, (key, part) in sorted(where.items()):
        if part is not None or not (UNET_TARGETS.match(module) or TE_TARGETS.match(module)):
            continue
        shape = base.shape(key)  # SD1.5's proj_in/proj_out are 1x1 convs: their LoRA weights are 1x1 too
        ones = (1,) * (len(shape) - 2)
        tensors[f"{module}.lora_down.weight"] = torch.randn(4, shape[1], *ones, generator=generator) * 0.05
        tensors[f"{module}.lora_up.weight"] = torch.randn(shape[0], 4, *ones, generator=generator) * 0.05
        tensors[f"{module}.alpha"] = torch.tensor(4.0)
    assert sum(k.startswith("lora_unet_") for k in tensors) // 3 >= 100 and any(k.startswith("lora_te_") for k in tensors)
    path = save_lora(comfy_base / "models" / "loras" / LORA, {k: v.to(torch.float16) for k, v in tensors.items()},
                     {"ss_base_model_version": "sd_v1", "ss_network_dim": "4", "ss_network_alpha": "4"})
    return path.name


def _sampling_graph(ckpt_name: str, lora: str | None, prefix: str) -> dict:
    """Load → (LoraLoader at STRENGTH) → prompt → KSampler (SEED, 3 steps, 64 px) → VAE Decode → Save Image."""
    model, clip = ["1", 0], ["1", 1]
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}}}
    if lora:
        graph["2"] = {"class_type": "LoraLoader", "inputs": {"model": model, "clip": clip, "lora_name": lora,
                                                              "strength_model": STRENGTH, "strength_clip": STRENGTH}}
        model, clip = ["2", 0], ["2", 1]
    graph.update({
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "an ink-wash village in the rain"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "blurry"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": model, "positive": ["3", 0], "negative": ["4", 0],
                                                   "latent_image": ["5", 0], "seed": SEED, "steps": 3, "cfg": 7.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": prefix}},
    })
    return graph


def _picture(server, graph: dict):
    """The one picture the graph's Save Image wrote, as an int16 array (so differences do not wrap)."""
    import numpy as np
    from PIL import Image

    entry = server.wait(server.queue(graph))
    [image] = entry["outputs"]["8"]["images"]
    path = server.base / "output" / image["subfolder"] / image["filename"]
    with Image.open(path) as picture:
        return np.asarray(picture.convert("RGB"), dtype=np.int16)


def _difference(a, b) -> tuple[float, int]:
    """(mean, max) absolute difference of two pictures, in 0–255 levels."""
    diff = abs(a - b)
    return float(diff.mean()), int(diff.max())


def test_merged_checkpoints_sample_like_the_base_with_the_lora(comfy_server, sd15_checkpoint, random_lora,
                                                              example_workflow, capsys):
    from lora_trainer.adapters.merge import merge_into_checkpoint

    base_dir = comfy_server.base
    checkpoints = base_dir / "models" / "checkpoints"
    # The example graph, as a user queues it once the names are theirs.
    prompt = copy.deepcopy(example_workflow(API_GRAPH))
    [loader] = [n for n in prompt.values() if n["class_type"] == "CheckpointLoaderSimple"]
    [lora_loader] = [n for n in prompt.values() if n["class_type"] == "LoraLoader"]
    [save] = [n for n in prompt.values() if n["class_type"] == "CheckpointSave"]
    loader["inputs"]["ckpt_name"] = sd15_checkpoint
    lora_loader["inputs"].update(lora_name=random_lora, strength_model=STRENGTH, strength_clip=STRENGTH)
    save["inputs"]["filename_prefix"] = "checkpoints/ci_baked"
    comfy_server.wait(comfy_server.queue(prompt))
    written = sorted((base_dir / "output" / "checkpoints").glob("ci_baked_*.safetensors"))
    assert [p.name for p in written] == ["ci_baked_00001_.safetensors"], written
    (checkpoints / "comfy_baked.safetensors").symlink_to(written[0])  # CheckpointSave writes to output/

    # This project's merge of the same LoRA at the same strength (streamed; the base keeps its fp16).
    merge_into_checkpoint(checkpoints / sd15_checkpoint, [(base_dir / "models" / "loras" / random_lora, STRENGTH)],
                          checkpoints / "ours_merged.safetensors")

    with_lora = _picture(comfy_server, _sampling_graph(sd15_checkpoint, random_lora, "ci_base_lora"))
    base_only = _picture(comfy_server, _sampling_graph(sd15_checkpoint, None, "ci_base"))
    comfy_baked = _picture(comfy_server, _sampling_graph("comfy_baked.safetensors", None, "ci_comfy_baked"))
    ours = _picture(comfy_server, _sampling_graph("ours_merged.safetensors", None, "ci_ours_merged"))
    numbers = {"base alone vs base + LoRA": _difference(base_only, with_lora),
               "CheckpointSave's file vs base + LoRA": _difference(comfy_baked, with_lora),
               "merge_into_checkpoint's file vs base + LoRA": _difference(ours, with_lora)}
    with capsys.disabled():
        print(f"\nLoRA at {STRENGTH}, seed {SEED}, 3 steps, 64 px; |difference| in 0-255 levels (mean, max):")
        for what, (mean, most) in numbers.items():
            print(f"  {what}: mean {mean:.3f}, max {most}")
    assert "lora key not loaded" not in comfy_server.log(), comfy_server.log_tail()
    lora_effect = numbers["base alone vs base + LoRA"][0]
    assert lora_effect > 5, numbers  # the LoRA moves the picture: matching the LoRA is not matching the base
    for what in ("CheckpointSave's file vs base + LoRA", "merge_into_checkpoint's file vs base + LoRA"):
        mean, most = numbers[what]
        assert mean < 0.5 and mean < lora_effect / 20, numbers
