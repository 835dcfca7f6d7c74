"""Write the example graph in ComfyUI's two formats and draw its picture for the README.

    python example_workflows/make_workflows.py

One table of nodes and links below gives `caption_train_sample_api.json` (what `POST /prompt`
takes), `caption_train_sample.json` (what the ComfyUI editor loads: Workflow → Open, or drag the
file in) and `caption_train_sample.png` (boxes and links, drawn with PIL).
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
CKPT = "v1-5-pruned-emaonly.safetensors"
DATA = "/path/to/my_images"

# id: (class, title, position, size, widgets (name, value) in widget order, inputs {name: (type, from id, slot)},
#      outputs [(name, type)])
NODES = {
    1: ("CheckpointLoaderSimple", "Load Checkpoint", (40, 300), (300, 100), [("ckpt_name", CKPT)], {},
        [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    2: ("LoraTrainerCaptionFolder", "Caption Folder", (40, 40), (300, 170),
        [("folder", DATA), ("trigger_word", "xyzvillage"), ("model", "coca_ViT-L-14"), ("overwrite", False)], {},
        [("dataset_path", "STRING"), ("captions", "STRING")]),
    3: ("LoraTrainerTrain", "Train LoRA", (400, 40), (320, 420),
        [("dataset_path", ""), ("lora_name", "village"), ("rank", 16), ("alpha", 32.0), ("steps", 1000),
         ("learning_rate", 0.0001), ("resolution", 512), ("batch_size", 1), ("seed", 42), ("control", "fixed"),
         ("ckpt_name", "(use the MODEL, CLIP and VAE inputs)"), ("config_file", ""), ("resume", False)],
        {"dataset_path": ("STRING", 2, 0), "model": ("MODEL", 1, 0), "clip": ("CLIP", 1, 1), "vae": ("VAE", 1, 2)},
        [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("lora_name", "STRING"), ("loss_curve", "IMAGE")]),
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
    11: ("LoraTrainerStrengthGrid", "LoRA Strength Grid", (1140, 380), (320, 380),
         [("prompt", "xyzvillage, ink-wash village in the rain"), ("negative", "blurry, low quality"),
          ("strengths", "0.5,0.6,0.7,0.8"), ("seed", 1), ("control", "fixed"), ("steps", 25), ("cfg", 7.0),
          ("width", 512), ("height", 512)],
         {"model": ("MODEL", 1, 0), "clip": ("CLIP", 1, 1), "vae": ("VAE", 1, 2), "trained_lora": ("STRING", 3, 2)},
         [("grid", "IMAGE")]),
    12: ("SaveImage", "Save grid", (1500, 380), (400, 300), [("filename_prefix", "village_grid")],
         {"images": ("IMAGE", 11, 0)}, []),
}
LINKED_WIDGETS = {"dataset_path", "trained_lora"}


def api_format() -> dict:
    prompt = {}
    for nid, (cls, title, _, _, widgets, inputs, _) in NODES.items():
        values = {k: v for k, v in widgets if k != "control" and k not in inputs}
        values.update({name: [str(src), slot] for name, (_, src, slot) in inputs.items()})
        prompt[str(nid)] = {"class_type": cls, "inputs": values, "_meta": {"title": title}}
    return prompt


def ui_format() -> dict:
    links, outputs = [], {nid: [[] for _ in n[6]] for nid, n in NODES.items()}
    inputs_ui = {}
    for nid, (_, _, _, _, widgets, inputs, _) in NODES.items():
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
    nodes = []
    for order, (nid, (cls, title, pos, size, widgets, _, outs)) in enumerate(NODES.items()):
        nodes.append({
            "id": nid, "type": cls, "title": title, "pos": list(pos), "size": list(size), "flags": {}, "order": order,
            "mode": 0, "inputs": inputs_ui[nid],
            "outputs": [{"name": n, "type": t, "links": outputs[nid][i], "slot_index": i}
                        for i, (n, t) in enumerate(outs)],
            "properties": {"Node name for S&R": cls}, "widgets_values": [v for _, v in widgets],
        })
    return {"last_node_id": max(NODES), "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {}, "version": 0.4}


COLORS = {"MODEL": (180, 140, 250), "CLIP": (250, 210, 90), "VAE": (250, 120, 120), "STRING": (140, 220, 140),
          "IMAGE": (100, 180, 250), "LATENT": (250, 150, 200), "CONDITIONING": (250, 170, 90)}


def draw(workflow: dict, path: Path, scale: float = 0.8) -> None:
    """Boxes, titles, input/output slots and right-angled links, in ComfyUI's dark theme."""
    font = ImageFont.load_default()
    width = int(max(n["pos"][0] + n["size"][0] for n in workflow["nodes"]) * scale) + 40
    height = int(max(n["pos"][1] + n["size"][1] for n in workflow["nodes"]) * scale) + 60
    img = Image.new("RGB", (width, height), (32, 32, 32))
    d = ImageDraw.Draw(img)
    byid = {n["id"]: n for n in workflow["nodes"]}

    def box(n):
        x, y = n["pos"][0] * scale + 10, n["pos"][1] * scale + 30
        return x, y, x + n["size"][0] * scale, y + n["size"][1] * scale

    def slot(n, i, out):
        x0, y0, x1, _ = box(n)
        return (x1 if out else x0), y0 + 30 + i * 16

    for n in workflow["nodes"]:
        x0, y0, x1, y1 = box(n)
        mine = n["type"].startswith("LoraTrainer")
        d.rectangle([x0, y0 - 22, x1, y1], fill=(53, 53, 53), outline=(120, 200, 120) if mine else (90, 90, 90),
                    width=2)
        d.rectangle([x0, y0 - 22, x1, y0], fill=(40, 70, 40) if mine else (30, 30, 30))
        d.text((x0 + 8, y0 - 17), n["title"], fill=(230, 230, 230), font=font)
        for i, row in enumerate(n["inputs"]):
            x, y = slot(n, i, False)
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=COLORS.get(row["type"], (200, 200, 200)))
            d.text((x + 8, y - 6), row["name"], fill=(200, 200, 200), font=font)
        for i, row in enumerate(n["outputs"]):
            x, y = slot(n, i, True)
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=COLORS.get(row["type"], (200, 200, 200)))
            d.text((x - 8 - d.textlength(row["name"], font=font), y - 6), row["name"], fill=(200, 200, 200), font=font)
        widgets = [v for v in n["widgets_values"] if v != "fixed"]
        top = y0 + 30 + max(len(n["inputs"]), len(n["outputs"])) * 16
        for j, value in enumerate(widgets):
            y = top + j * 15
            if y > y1 - 12:
                break
            d.text((x0 + 10, y), str(value)[:42], fill=(150, 150, 150), font=font)
    for _, src, sslot, dst, dslot, tp in workflow["links"]:
        a, b = slot(byid[src], sslot, True), slot(byid[dst], dslot, False)
        mid = (a[0] + b[0]) / 2
        d.line([a, (mid, a[1]), (mid, b[1]), b], fill=COLORS.get(tp, (200, 200, 200)), width=2)
    d.text((12, 8), "caption -> train -> sample (green: LoRA Trainer nodes)", fill=(230, 230, 230), font=font)
    img.save(path)


def main() -> None:
    (HERE / "caption_train_sample_api.json").write_text(json.dumps(api_format(), indent=2) + "\n", encoding="utf-8")
    ui = ui_format()
    (HERE / "caption_train_sample.json").write_text(json.dumps(ui, indent=2) + "\n", encoding="utf-8")
    draw(ui, HERE / "caption_train_sample.png")


if __name__ == "__main__":
    main()
