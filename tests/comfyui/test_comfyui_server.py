"""The pack in a real ComfyUI 0.8.0 server (CPU): it loads, and the example graph runs through the HTTP API.

The example API graph (Caption Folder → Train LoRA → KSampler / LoRA Strength Grid), cut down for the
CPU: a captioned folder (Caption Folder keeps the captions, so no captioner weights), 2 steps at 64 px.
Queued twice: the first run trains and saves one LoRA into models/loras; the second, with nothing
changed, must come from ComfyUI's cache (Train LoRA's IS_CHANGED must be stable for a linked dataset).
"""

from __future__ import annotations

import copy
import json
import re

OUR_NODES = ("LoraTrainerCaptionFolder", "LoraTrainerTrain", "LoraTrainerStrengthGrid")
PACK_PATH = "custom_nodes/lora-scripts/"
API_GRAPH = ("api/caption_train_sample.json", "caption_train_sample_api.json")


def _node_id(prompt: dict, class_type: str) -> str:
    ids = [k for k, v in prompt.items() if v["class_type"] == class_type]
    assert len(ids) == 1, f"{class_type}: {ids} in the example API graph"
    return ids[0]


def _messages(entry: dict, event: str) -> list[dict]:
    """status.messages of a history entry: [event, data] pairs, in the order ComfyUI sent them."""
    return [data for name, data in entry["status"]["messages"] if name == event]


def _loras(base) -> set[str]:
    return {p.name for p in (base / "models" / "loras").glob("*.safetensors")}


def test_pack_loads_without_an_import_error(comfy_server):
    info = comfy_server.get("/object_info")
    missing = [name for name in OUR_NODES if name not in info]
    log = comfy_server.log()
    assert not missing, f"not in /object_info: {missing}\n{comfy_server.log_tail()}"
    assert all(info[name]["category"] == "LoRA Trainer" for name in OUR_NODES)
    ours = [line for line in log.splitlines() if "custom_nodes" in line and "lora-scripts" in line]
    assert ours and not any("IMPORT FAILED" in line or "Cannot import" in line for line in ours), "\n".join(ours)
    lines = log.splitlines()
    tracebacks = ["\n".join(lines[i:i + 40]) for i, line in enumerate(lines) if line.startswith("Traceback")]
    assert not [t for t in tracebacks if PACK_PATH in t], f"a traceback through the pack:\n{comfy_server.log_tail()}"

def test_example_graph_trains_once_then_comes_from_the_cache(comfy_server, sd15_checkpoint, captioned_dataset,
                                                             example_workflow):
    prompt = copy.deepcopy(example_workflow(*API_GRAPH))
    ckpt, caption = _node_id(prompt, "CheckpointLoaderSimple"), _node_id(prompt, "LoraTrainerCaptionFolder")
    train, grid = _node_id(prompt, "LoraTrainerTrain"), _node_id(prompt, "LoraTrainerStrengthGrid")
    check = _node_id(prompt, "LoraTrainerCheckDataset")
    # the folder arrives through links (Caption Folder → Check Dataset → Train LoRA): IS_CHANGED sees None
    assert prompt[check]["inputs"]["folder"] == [caption, 0] and prompt[train]["inputs"]["dataset_path"] == [check, 0]
    prompt[ckpt]["inputs"]["ckpt_name"] = sd15_checkpoint
    prompt[caption]["inputs"].update(folder=str(captioned_dataset), overwrite=False)
    prompt[train]["inputs"].update(lora_name="ci_lora", steps=2, resolution=64, rank=4, alpha=4.0, batch_size=1)
    prompt[grid]["inputs"].update(steps=1, width=64, height=64, strengths="0,1")
    for node in prompt.values():
        if node["class_type"] in ("KSampler", "KSamplerAdvanced"):
            node["inputs"]["steps"] = 1
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=64, height=64)

    before = _loras(comfy_server.base)
    first = comfy_server.wait(comfy_server.queue(prompt))
    new = _loras(comfy_server.base) - before
    assert len(new) == 1 and next(iter(new)).startswith("ci_lora"), f"new files in models/loras: {sorted(new)}"
    saved = next(iter(new))
    ui = first["outputs"].get(train, {})
    texts = [t for t in ui.get("text", []) if isinstance(t, str)]
    assert any(saved in t for t in texts), f"Train LoRA's ui output should name {saved}: {json.dumps(ui)[:2000]}"
    assert not re.search(r"lora key not loaded", comfy_server.log()), comfy_server.log_tail()
    scored = " ".join(first["outputs"].get(grid, {}).get("text", []))
    assert scored.startswith("scoring skipped: Captioner weights"), f"the grid's scores: {scored[:500]}"  # no CoCa
    checked = " ".join(first["outputs"].get(check, {}).get("text", []))
    assert " usable" in checked and "steps per epoch" in checked, f"Check Dataset's report: {checked[:2000]}"

    second = comfy_server.wait(comfy_server.queue(prompt))
    again = sorted(_loras(comfy_server.base) - before - new)
    cached = [node for m in _messages(second, "execution_cached") for node in m["nodes"]]
    warnings = [line for line in comfy_server.log().splitlines() if line.startswith("WARNING")][-5:]
    assert train in cached and check in cached and not again, (
        f"Train LoRA (node {train}) ran again instead of coming from the cache (new files: {again}; cached "
        f"nodes: {cached}); ComfyUI's last warnings (IS_CHANGED errors show here): {warnings}")
