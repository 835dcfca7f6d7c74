"""Write the example graphs in ComfyUI's two formats.

    python example_workflows/make_workflows.py

One table of nodes and links per graph below gives `<name>.json` (what the ComfyUI editor loads;
ComfyUI lists every JSON directly in this folder as a template, so only editor graphs live here) and
`api/<name>.json` (what `POST /prompt` takes; frontend-only nodes such as a Note are left out). Each
template's thumbnail, `<name>.jpg`, is a screenshot of its graph in the real ComfyUI frontend, taken
by tests/comfyui (COMFYUI_SCREENSHOTS=example_workflows writes them all).

- `caption_train_sample`: Caption Folder → Check Dataset → Train LoRA → KSampler and LoRA Strength Grid.
- `flux_train_sample`: Load Diffusion Model + DualCLIPLoader + Load VAE → Check Dataset → Train Flux LoRA →
  KSampler (FluxGuidance 3.5) with the MODEL it hands on (the LoRA applied).
- `merge_lora_into_checkpoint`: Load Checkpoint → LoraLoader → CheckpointSave, ComfyUI's own nodes: the
  LoRA baked into a new checkpoint at a strength (tests/comfyui checks the file samples like the base
  with the LoRA at that strength).
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
CKPT = "v1-5-pruned-emaonly.safetensors"
DATA = "/path/to/my_images"

# id: (class, title, position, size, widgets (name, value) in widget order, inputs {name: (type, from id, slot)},
#      outputs [(name, type)])
CAPTION_TRAIN_SAMPLE = {
    1: ("CheckpointLoaderSimple", "Load Checkpoint", (40, 300), (300, 100), [("ckpt_name", CKPT)], {},
        [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    2: ("LoraTrainerCaptionFolder", "Caption Folder", (40, 40), (300, 170),
        [("folder", DATA), ("trigger_word", "xyzvillage"), ("model", "coca_ViT-L-14"), ("overwrite", False),
         ("weights", "(auto)")], {},
        [("dataset_path", "STRING"), ("captions", "STRING")]),
    3: ("LoraTrainerTrain", "Train LoRA", (400, 40), (320, 480),
        [("dataset_path", ""), ("lora_name", "village"), ("rank", 16), ("alpha", 32.0), ("steps", 1000),
         ("learning_rate", 0.0001), ("resolution", 512), ("batch_size", 1), ("seed", 42), ("control", "fixed"),
         ("ckpt_name", "(from inputs)"), ("config_file", ""), ("resume", False)],
        {"dataset_path": ("STRING", 13, 0), "model": ("MODEL", 1, 0), "clip": ("CLIP", 1, 1), "vae": ("VAE", 1, 2)},
        [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("lora_name", "STRING"), ("loss_curve", "IMAGE"), ("report", "STRING")]),
    4: ("CLIPTextEncode", "Positive", (780, 40), (300, 120), [("text", "xyzvillage, ink-wash village in the rain")],
        {"clip": ("CLIP", 3, 1)}, [("CONDITIONING", "CONDITIONING")]),
    5: ("CLIPTextEncode", "Negative", (780, 200), (300, 120), [("text", "blurry, low quality")],
        {"clip": ("CLIP", 3, 1)}, [("CONDITIONING", "CONDITIONING")]),
    6: ("EmptyLatentImage", "Empty Latent Image", (780, 360), (300, 110),
        [("width", 512), ("height", 512), ("batch_size", 1)], {}, [("LATENT", "LATENT")]),
    7: ("KSampler", "KSampler", (1140, 40), (300, 270),
        [("seed", 1), ("control", "fixed"), ("steps", 25), ("cfg", 7.0), ("sampler_name", "euler"),
         ("scheduler", "normal"), ("denoise", 1.0)],
        {"model": ("MODEL", 3, 0), "positive": ("CONDITIONING", 4, 0), "negative": ("CONDITIONING", 5, 0),
         "latent_image": ("LATENT", 6, 0)}, [("LATENT", "LATENT")]),
    8: ("VAEDecode", "VAE Decode", (1500, 40), (200, 60), [], {"samples": ("LATENT", 7, 0), "vae": ("VAE", 1, 2)},
        [("IMAGE", "IMAGE")]),
    9: ("SaveImage", "Save Image", (1760, 40), (260, 270), [("filename_prefix", "village")],
        {"images": ("IMAGE", 8, 0)}, []),
    10: ("PreviewImage", "Loss curve", (780, 520), (300, 200), [], {"images": ("IMAGE", 3, 3)}, []),
    11: ("LoraTrainerStrengthGrid", "LoRA Strength Grid", (1140, 380), (320, 420),
         [("prompt", "xyzvillage, ink-wash village in the rain"), ("negative", "blurry, low quality"),
          ("strengths", "0.5,0.6,0.7,0.8"), ("seed", 1), ("control", "fixed"), ("steps", 25), ("cfg", 7.0),
          ("width", 512), ("height", 512), ("lora_name", "(from input)"), ("clip_weights", "(auto)")],
         {"model": ("MODEL", 1, 0), "clip": ("CLIP", 1, 1), "vae": ("VAE", 1, 2), "trained_lora": ("STRING", 3, 2),
          "reference_dir": ("STRING", 13, 0)},
         [("grid", "IMAGE"), ("scores", "STRING"), ("best_strength", "FLOAT")]),
    12: ("SaveImage", "Save grid", (1500, 380), (400, 300), [("filename_prefix", "village_grid")],
         {"images": ("IMAGE", 11, 0)}, []),
    13: ("LoraTrainerCheckDataset", "Check Dataset", (40, 450), (300, 130),
         [("folder", ""), ("trigger_word", "xyzvillage"), ("config_file", "")], {"folder": ("STRING", 2, 0)},
         [("dataset_path", "STRING"), ("report", "STRING")]),
}

MERGE_NOTE = ("Bakes the LoRA into the checkpoint at Load LoRA's strengths (strength_model for the UNet, strength_clip "
              "for the text encoder: keep them equal for what <lora:village:0.7> does). Save Checkpoint writes "
              "output/checkpoints/v1-5+village-0.7_00001_.safetensors, in the precision ComfyUI runs the model in "
              "(fp16 on most GPUs, fp32 on the CPU). Move it to models/checkpoints to load it. "
              "python -m lora_trainer merge does the same without loading the model, keeping the base's precision.")
MERGE_LORA_INTO_CHECKPOINT = {
    1: ("CheckpointLoaderSimple", "Load Checkpoint", (40, 40), (300, 100), [("ckpt_name", CKPT)], {},
        [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    2: ("LoraLoader", "Load LoRA", (400, 40), (320, 130),
        [("lora_name", "village.safetensors"), ("strength_model", 0.7), ("strength_clip", 0.7)],
        {"model": ("MODEL", 1, 0), "clip": ("CLIP", 1, 1)}, [("MODEL", "MODEL"), ("CLIP", "CLIP")]),
    3: ("CheckpointSave", "Save Checkpoint", (780, 40), (340, 100), [("filename_prefix", "checkpoints/v1-5+village-0.7")],
        {"model": ("MODEL", 2, 0), "clip": ("CLIP", 2, 1), "vae": ("VAE", 1, 2)}, []),
    4: ("Note", "Where the checkpoint goes", (40, 220), (1080, 110), [("text", MERGE_NOTE)], {}, []),
}
FLUX_NOTE = ("Flux.1 from ComfyUI's own loaders: Load Diffusion Model (models/diffusion_models), DualCLIPLoader type "
             "flux (T5-XXL and CLIP-L, models/text_encoders) and Load VAE (ae.safetensors). Train Flux LoRA trains on "
             "them (names left at (from inputs); pick a file instead to read that part from disk) and hands on the "
             "MODEL with the new LoRA applied. Later, in any graph: LoraLoaderModelOnly with lora_name "
             "my_flux_lora.safetensors. Memory: set base_precision: fp8 (and offload: blocks under 16 GB) in a config "
             "file, docs/flux.md.")
FLUX_TRAIN_SAMPLE = {
    1: ("UNETLoader", "Load Diffusion Model", (40, 40), (320, 90),
        [("unet_name", "flux1-dev.safetensors"), ("weight_dtype", "default")], {}, [("MODEL", "MODEL")]),
    2: ("DualCLIPLoader", "DualCLIPLoader", (40, 180), (320, 130),
        [("clip_name1", "t5xxl_fp16.safetensors"), ("clip_name2", "clip_l.safetensors"), ("type", "flux"),
         ("device", "default")], {}, [("CLIP", "CLIP")]),
    3: ("VAELoader", "Load VAE", (40, 360), (320, 60), [("vae_name", "ae.safetensors")], {}, [("VAE", "VAE")]),
    4: ("LoraTrainerCheckDataset", "Check Dataset", (40, 470), (320, 130),
        [("folder", DATA), ("trigger_word", "xyzposter"), ("config_file", "")], {},
        [("dataset_path", "STRING"), ("report", "STRING")]),
    5: ("LoraTrainerTrainFlux", "Train Flux LoRA", (420, 40), (340, 520),
        [("unet_name", "(from inputs)"), ("clip_l_name", "(from inputs)"), ("t5xxl_name", "(from inputs)"),
         ("vae_name", "(from inputs)"), ("dataset_path", ""), ("lora_name", "my_flux_lora"), ("rank", 16),
         ("alpha", 16.0), ("steps", 1000), ("learning_rate", 0.0001), ("resolution", 1024), ("batch_size", 1),
         ("seed", 42), ("control", "fixed"), ("config_file", ""), ("resume", False)],
        {"dataset_path": ("STRING", 4, 0), "model": ("MODEL", 1, 0), "clip": ("CLIP", 2, 0), "vae": ("VAE", 3, 0)},
        [("MODEL", "MODEL"), ("lora_name", "STRING"), ("loss_curve", "IMAGE"), ("report", "STRING")]),
    6: ("CLIPTextEncode", "Prompt", (820, 40), (320, 130), [("text", "xyzposter, a travel poster of a harbour town")],
        {"clip": ("CLIP", 2, 0)}, [("CONDITIONING", "CONDITIONING")]),
    7: ("FluxGuidance", "FluxGuidance", (820, 220), (320, 60), [("guidance", 3.5)],
        {"conditioning": ("CONDITIONING", 6, 0)}, [("CONDITIONING", "CONDITIONING")]),
    8: ("ConditioningZeroOut", "Negative (zero)", (820, 330), (320, 30), [],
        {"conditioning": ("CONDITIONING", 6, 0)}, [("CONDITIONING", "CONDITIONING")]),
    9: ("EmptySD3LatentImage", "Empty Latent Image", (820, 410), (320, 110),
        [("width", 1024), ("height", 1024), ("batch_size", 1)], {}, [("LATENT", "LATENT")]),
    10: ("KSampler", "KSampler", (1200, 40), (320, 270),
         [("seed", 1), ("control", "fixed"), ("steps", 20), ("cfg", 1.0), ("sampler_name", "euler"),
          ("scheduler", "simple"), ("denoise", 1.0)],
         {"model": ("MODEL", 5, 0), "positive": ("CONDITIONING", 7, 0), "negative": ("CONDITIONING", 8, 0),
          "latent_image": ("LATENT", 9, 0)}, [("LATENT", "LATENT")]),
    11: ("VAEDecode", "VAE Decode", (1580, 40), (200, 60), [], {"samples": ("LATENT", 10, 0), "vae": ("VAE", 3, 0)},
         [("IMAGE", "IMAGE")]),
    12: ("SaveImage", "Save Image", (1840, 40), (300, 300), [("filename_prefix", "my_flux_lora")],
         {"images": ("IMAGE", 11, 0)}, []),
    13: ("PreviewImage", "Loss curve", (1200, 380), (320, 220), [], {"images": ("IMAGE", 5, 2)}, []),
    14: ("Note", "Flux", (40, 660), (720, 130), [("text", FLUX_NOTE)], {}, []),
}
GRAPHS = {"caption_train_sample": CAPTION_TRAIN_SAMPLE, "merge_lora_into_checkpoint": MERGE_LORA_INTO_CHECKPOINT,
          "flux_train_sample": FLUX_TRAIN_SAMPLE}
VIRTUAL = {"Note"}  # nodes only the frontend knows: in the editor graph, never in the API one
LINKED_WIDGETS = {"dataset_path", "folder", "trained_lora"}


def api_format(nodes: dict) -> dict:
    prompt = {}
    for nid, (cls, title, _, _, widgets, inputs, _) in nodes.items():
        if cls in VIRTUAL:
            continue
        values = {k: v for k, v in widgets if k != "control" and k not in inputs}
        values.update({name: [str(src), slot] for name, (_, src, slot) in inputs.items()})
        prompt[str(nid)] = {"class_type": cls, "inputs": values, "_meta": {"title": title}}
    return prompt


def ui_format(nodes: dict) -> dict:
    links, outputs = [], {nid: [[] for _ in n[6]] for nid, n in nodes.items()}
    inputs_ui = {}
    for nid, (_, _, _, _, widgets, inputs, _) in nodes.items():
        rows = []
        for name, (tp, src, slot) in inputs.items():
            link_id = len(links) + 1
            links.append([link_id, src, slot, nid, len(rows), tp])
            outputs[src][slot].append(link_id)
            row = {"name": name, "type": tp, "link": link_id}
            if name in LINKED_WIDGETS:
                row["widget"] = {"name": name}
            rows.append(row)
        inputs_ui[nid] = rows
    shown = []
    for order, (nid, (cls, title, pos, size, widgets, _, outs)) in enumerate(nodes.items()):
        shown.append({
            "id": nid, "type": cls, "title": title, "pos": list(pos), "size": list(size), "flags": {}, "order": order,
            "mode": 0, "inputs": inputs_ui[nid],
            "outputs": [{"name": n, "type": t, "links": outputs[nid][i], "slot_index": i}
                        for i, (n, t) in enumerate(outs)],
            "properties": {"Node name for S&R": cls}, "widgets_values": [v for _, v in widgets],
        })
    return {"last_node_id": max(nodes), "last_link_id": len(links), "nodes": shown, "links": links, "groups": [],
            "config": {}, "extra": {}, "version": 0.4}


def main() -> None:
    (HERE / "api").mkdir(exist_ok=True)
    for name, nodes in GRAPHS.items():
        (HERE / "api" / f"{name}.json").write_text(json.dumps(api_format(nodes), indent=2) + "\n", encoding="utf-8")
        (HERE / f"{name}.json").write_text(json.dumps(ui_format(nodes), indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
