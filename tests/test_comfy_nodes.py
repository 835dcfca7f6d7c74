"""The ComfyUI nodes, called as ComfyUI calls them, against stand-in ComfyUI modules (tests/comfy_stubs.py)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import comfy_stubs

pytestmark = pytest.mark.comfy

ROOT = Path(__file__).resolve().parents[1]
KOHYA_KEY = re.compile(r"^lora_(unet|te|te1|te2)_[A-Za-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


@pytest.fixture
def pack():
    return comfy_stubs.load_pack(ROOT)


@pytest.fixture
def comfy(tmp_path, tiny_sd1):
    state = comfy_stubs.install(tmp_path / "comfy", tiny_sd1)
    yield state
    comfy_stubs.uninstall()


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "node.yaml"
    path.write_text("device: cpu\nmin_bucket_reso: 64\nmax_bucket_reso: 128\nsample_steps: 2\n"
                    "train_text_encoder: true\n", encoding="utf-8")
    return str(path)


def train_inputs(demo_folder, config_file, **changes):
    values = dict(dataset_path=str(demo_folder), lora_name="village", rank=4, alpha=4.0, steps=2, learning_rate=1e-3,
                  resolution=64, batch_size=2, seed=0, config_file=config_file)
    values.update(changes)
    return values


def test_root_package_imports_outside_comfyui(pack):
    assert not any(name in sys.modules for name in comfy_stubs.MODULES)
    assert set(pack.NODE_CLASS_MAPPINGS) == {"LoraTrainerCaptionFolder", "LoraTrainerCheckDataset", "LoraTrainerTrain",
                                             "LoraTrainerTrainFlux", "LoraTrainerStrengthGrid", "LoraTrainerCompare"}
    # ComfyUI's own node is called "Train LoRA": ours carry the pack's name, the class names stay
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS.values()) == {
        "Caption Folder (lora-scripts)", "Check Dataset (lora-scripts)", "Train LoRA (lora-scripts)",
        "Train Flux LoRA (lora-scripts)", "LoRA Strength Grid (lora-scripts)", "Compare LoRAs (lora-scripts)"}
    assert pack.WEB_DIRECTORY == "./comfy_nodes/web" and (ROOT / pack.WEB_DIRECTORY / "lora_trainer.js").is_file()
    assert not any(name in sys.modules for name in comfy_stubs.MODULES)


def test_inputs_are_typed_bounded_and_explained(pack, comfy):
    from lora_trainer.config import field_help

    for cls in pack.NODE_CLASS_MAPPINGS.values():
        assert cls.CATEGORY == "LoRA Trainer" and callable(getattr(cls(), cls.FUNCTION))
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS)
        spec = cls.INPUT_TYPES()
        for name, (kind, options) in {**spec["required"], **spec.get("optional", {})}.items():
            assert options.get("tooltip"), f"{cls.__name__}.{name} has no tooltip"
            if kind in ("INT", "FLOAT"):
                assert options["min"] <= options["default"] <= options["max"], f"{cls.__name__}.{name}"
    train = pack.NODE_CLASS_MAPPINGS["LoraTrainerTrain"].INPUT_TYPES()
    assert train["required"]["rank"][1]["tooltip"].startswith(field_help()["lora_rank"]["help"])
    assert train["required"]["learning_rate"][0] == "FLOAT"
    # new outputs only at the end: the links of saved workflows keep their slots
    assert pack.NODE_CLASS_MAPPINGS["LoraTrainerTrain"].RETURN_TYPES == ("MODEL", "CLIP", "STRING", "IMAGE", "STRING")


def test_train_widgets_say_what_the_node_does(pack, comfy):
    train_node = sys.modules[f"{comfy_stubs.PACK}.comfy_nodes.train_node"]
    spec = pack.NODE_CLASS_MAPPINGS["LoraTrainerTrain"].INPUT_TYPES()
    required, optional = spec["required"], spec["optional"]
    # where the node narrows a config field, the tooltip says what the node does, not what the config does
    assert required["steps"][1]["min"] == 1 and "0 uses" not in required["steps"][1]["tooltip"]
    assert "empty" not in required["lora_name"][1]["tooltip"] and "-v2" in required["lora_name"][1]["tooltip"]
    # the checkpoint selector has a default (search previews show it) short enough to leave its label readable
    ckpt = optional["ckpt_name"]
    assert ckpt[1]["default"] == train_node.FROM_GRAPH == ckpt[0][0] and len(train_node.FROM_GRAPH) <= 16
    # the seed keeps its control widget (the user may still pick randomize); web/lora_trainer.js preselects fixed
    assert required["seed"][1]["control_after_generate"] is True
    js = (ROOT / "comfy_nodes" / "web" / "lora_trainer.js").read_text(encoding="utf-8")
    assert '"LoraTrainerTrain"' in js and 'control.value = "fixed"' in js


def frontend_float(value, options):
    """ComfyUI frontend 1.35's FLOAT widget (useFloatWidget): precision from the step, values rounded to it."""
    import math

    precision = max(0, -math.floor(math.log10(options["step"])))
    step = 10 ** -precision
    return round(math.floor(value / step + 0.5) * step, precision)  # JavaScript's Math.round


def test_learning_rate_keeps_the_values_people_type(pack, comfy):
    options = pack.NODE_CLASS_MAPPINGS["LoraTrainerTrain"].INPUT_TYPES()["required"]["learning_rate"][1]
    for typed in (0.000025, 1e-4, 0.0003, 5e-5, 1.5e-6, 0.001, 1e-7):
        assert frontend_float(typed, options) == pytest.approx(typed, rel=1e-9), typed
    assert frontend_float(0.000025, {"step": 1e-5}) == pytest.approx(0.00003)  # the old step rounded it


def test_train_node_trains_saves_into_loras_and_applies_the_lora(pack, comfy, tiny_sd1, tiny_sd1_file, demo_folder,
                                                                 config_file):
    model, clip, vae = comfy_stubs.graph_models(tiny_sd1_file, tiny_sd1)
    node = pack.NODE_CLASS_MAPPINGS["LoraTrainerTrain"]()
    with torch.inference_mode():  # as ComfyUI runs every node
        out = node.train(model=model, clip=clip, vae=vae, unique_id="7", **train_inputs(demo_folder, config_file))
    model_out, clip_out, name, curve, report = out["result"]

    path = comfy.base / "models" / "loras" / name
    assert name == "village.safetensors" and path.is_file()
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(KOHYA_KEY.match(k) for k in keys)
    assert any(k.startswith("lora_te_") for k in keys)
    assert meta["ss_output_name"] == "village" and meta["ss_base_model_version"] == "sd_v1"
    assert model_out is not model and model.patches == [] and model_out.patches[0][0] == 1.0
    assert clip_out is not clip and clip_out.patches and clip_out.patches[0][1]
    assert curve.shape == (1, 256, 512, 3) and 0 <= curve.min() and curve.max() <= 1
    # which file to load, how it went, where the rest went: on the node (ui.text) and as an output
    assert out["ui"]["text"] == [report]
    assert report.startswith("saved village.safetensors in models/loras\n2 steps, final loss ")
    assert str(comfy.base / "output" / "lora_trainer" / "village") in report
    page = comfy.base / "output" / "lora_trainer" / "village" / "report.html"  # every run writes its page
    assert f"\nreport: {page}\n" in report and page.is_file()
    # ComfyUI's models left the GPU before training; the graph's weights were taken as CheckpointSave does
    assert "unload_all_models" in comfy.calls and "soft_empty_cache" in comfy.calls
    assert any("force_patch_weights" in c for c in comfy.calls)
    assert comfy.progress[-1] == (2, 2) and not any(comfy.inference_mode_seen)
    import folder_paths

    assert folder_paths.get_filename_list("loras") == ["village.safetensors"]

    with torch.inference_mode():  # the same name again: a new file, the first is never overwritten
        again = node.train(model=model, clip=clip, vae=vae, **train_inputs(demo_folder, config_file))
    assert again["result"][2] == "village-v2.safetensors" and path.is_file()
    assert again["ui"]["text"][0].startswith("saved village-v2.safetensors")
    assert str(comfy.base / "output" / "lora_trainer" / "village-v2") in again["ui"]["text"][0]  # its own folder


def test_cancel_stops_within_a_step_and_resume_finishes(pack, comfy, tiny_sd1, tiny_sd1_file, demo_folder, config_file):
    model, clip, vae = comfy_stubs.graph_models(tiny_sd1_file, tiny_sd1)
    node = pack.NODE_CLASS_MAPPINGS["LoraTrainerTrain"]()
    comfy.interrupt_at_step = 1
    with torch.inference_mode(), pytest.raises(comfy_stubs.InterruptProcessingException):
        node.train(model=model, clip=clip, vae=vae, **train_inputs(demo_folder, config_file, steps=3))
    out_dir = comfy.base / "output" / "lora_trainer" / "village"
    assert list((out_dir / "state").iterdir()), "no resumable state was kept"
    assert not list((comfy.base / "models" / "loras").iterdir())
    assert comfy.progress[-1][0] == 1

    comfy.interrupt_at_step, comfy.interrupted = None, False
    with torch.inference_mode():
        out = node.train(model=model, clip=clip, vae=vae, resume=True,
                         **train_inputs(demo_folder, config_file, steps=3))
    assert out["result"][2] == "village.safetensors" and comfy.progress[-1] == (3, 3)


def test_train_refuses_missing_inputs_and_bad_names(pack, comfy, demo_folder, config_file):
    from lora_scripts_pack.lora_trainer.errors import ConfigError

    node = pack.NODE_CLASS_MAPPINGS["LoraTrainerTrain"]()
    with pytest.raises(ConfigError, match="Connect MODEL, CLIP and VAE"):
        node.train(**train_inputs(demo_folder, config_file))
    with pytest.raises(ConfigError, match="plain file name"):
        node.train(**train_inputs(demo_folder, config_file, lora_name="../evil"))
    with pytest.raises(ConfigError, match="Unknown config key"):
        bad = Path(config_file).with_name("bad.yaml")
        bad.write_text("lora_rnak: 4\n", encoding="utf-8")
        node.train(**train_inputs(demo_folder, str(bad)))


def test_is_changed_follows_the_dataset(pack, comfy, demo_folder, config_file):
    cls = pack.NODE_CLASS_MAPPINGS["LoraTrainerTrain"]
    first = cls.IS_CHANGED(**train_inputs(demo_folder, config_file))
    assert cls.IS_CHANGED(**train_inputs(demo_folder, config_file)) == first
    meta = demo_folder / "metadata.csv"
    meta.write_text(meta.read_text(encoding="utf-8").replace("circle", "disc"), encoding="utf-8")
    second = cls.IS_CHANGED(**train_inputs(demo_folder, config_file))
    assert second != first
    (demo_folder / "new.png").write_bytes((demo_folder / "img001.png").read_bytes())
    assert cls.IS_CHANGED(**train_inputs(demo_folder, config_file)) != second
    caption = pack.NODE_CLASS_MAPPINGS["LoraTrainerCaptionFolder"]
    assert caption.IS_CHANGED(folder=str(demo_folder)) != caption.IS_CHANGED(folder=str(demo_folder / "x"))


def comfy_is_changed(cls, inputs, linked):
    """What ComfyUI 0.8's IsChangedCache does: every input given, a linked one as None (execution.py
    get_input_data without outputs); an exception there makes ComfyUI run the node on every Run."""
    spec = cls.INPUT_TYPES()
    names = [*spec["required"], *spec.get("optional", {})]
    return cls.IS_CHANGED(**{name: None if name in linked else inputs.get(name) for name in names})


def test_is_changed_is_stable_when_inputs_are_linked(pack, comfy, demo_folder, config_file):
    cls = pack.NODE_CLASS_MAPPINGS["LoraTrainerTrain"]
    inputs = train_inputs(demo_folder, config_file)
    for linked in ({"model", "clip", "vae", "dataset_path"}, {"model", "clip", "vae", "dataset_path", "config_file"},
                   {"model", "clip", "vae"}):
        first = comfy_is_changed(cls, inputs, linked)
        assert isinstance(first, str) and first == comfy_is_changed(cls, inputs, linked)
    linked = {"model", "clip", "vae", "dataset_path"}
    before = comfy_is_changed(cls, inputs, linked)
    (demo_folder / "new.png").write_bytes((demo_folder / "img001.png").read_bytes())
    # a linked folder is Caption Folder's to fingerprint (ComfyUI keys Train on its signature), ...
    assert comfy_is_changed(cls, inputs, linked) == before
    caption = pack.NODE_CLASS_MAPPINGS["LoraTrainerCaptionFolder"]
    assert caption.IS_CHANGED(folder=None) == caption.IS_CHANGED(folder=None)
    # ... the config file is still read when it is typed
    Path(config_file).write_text(Path(config_file).read_text(encoding="utf-8") + "seed: 3\n", encoding="utf-8")
    assert comfy_is_changed(cls, inputs, linked) != before


def test_lora_key_check_names_modules_comfyui_would_drop(pack, comfy, tiny_sd1, tiny_sd1_file):
    from lora_scripts_pack.comfy_nodes.host import check_lora_keys
    from lora_scripts_pack.lora_trainer.errors import LoraTrainerError

    model, clip, _ = comfy_stubs.graph_models(tiny_sd1_file, tiny_sd1)
    good = sorted(model.model.lora_names)[0]
    check_lora_keys({f"{good}.alpha": 1, f"{good}.lora_up.weight": 1}, model, clip)
    with pytest.raises(LoraTrainerError, match="1 LoRA modules would not load.*lora_unet_nowhere"):
        check_lora_keys({"lora_unet_nowhere.alpha": 1, f"{good}.alpha": 1}, model, clip)


class FakeCaptioner:
    def __init__(self, options):
        self.options = options

    def caption(self, images):
        from lora_scripts_pack.lora_trainer.data.captions import Caption

        return [Caption(f"{self.options.trigger}, a test image {i}", "a test image") for i, _ in enumerate(images)]


def test_caption_folder_writes_captions_and_a_preview(pack, comfy, demo_folder):
    from lora_scripts_pack.lora_trainer.data.captions import CaptionOptions, read_captions

    (demo_folder / "metadata.csv").unlink()
    node = pack.NODE_CLASS_MAPPINGS["LoraTrainerCaptionFolder"]()
    node.captioner = FakeCaptioner(CaptionOptions(trigger="xyzvillage"))
    out = node.caption(folder=str(demo_folder), trigger_word="xyzvillage", model="coca_ViT-B-32",
                       overwrite=False, unique_id="3")
    path, preview = out["result"]
    assert out["ui"]["text"] == [preview]
    assert path == str(demo_folder)
    captions = read_captions(demo_folder).captions
    assert len(captions) == 8 and all(c.startswith("xyzvillage, a test image") for c in captions.values())
    assert "8 captioned" in preview and "img001.png: xyzvillage" in preview
    assert comfy.progress[-1] == (8, 8)


def test_strength_grid_samples_each_strength_through_comfyui(pack, comfy):
    from safetensors.torch import save_file

    save_file({"lora_unet_x.alpha": torch.tensor(4.0), "lora_te_y.alpha": torch.tensor(4.0)},
              str(comfy.base / "models" / "loras" / "village.safetensors"))
    model, clip = comfy_stubs.ModelPatcher(None), comfy_stubs.CLIP({}, set())
    node = pack.NODE_CLASS_MAPPINGS["LoraTrainerStrengthGrid"]()
    out = node.grid(model=model, clip=clip, vae=comfy_stubs.VAE({}), prompt="xyzvillage, rain", negative="",
                    strengths="0, 0.5,0.8", seed=1, steps=2, cfg=7.0, width=64, height=64,
                    trained_lora="village.safetensors")
    grid, scores, best = out["result"]
    assert scores.startswith("scoring skipped: connect reference_dir") and best == 0.0  # the grid works as before
    assert out["ui"]["text"] == [scores]
    assert comfy.sampled == [0, 0.5, 0.8] and model.patches == []
    assert grid.shape == (1, 64 + 24, 3 * 64, 3)
    assert float(grid[0, 40, 100, 0]) != float(grid[0, 40, 180, 0])  # the columns differ, each under its label
    from lora_scripts_pack.lora_trainer.errors import ConfigError

    with pytest.raises(ConfigError, match="strengths"):
        node.grid(model=model, clip=clip, vae=None, prompt="", negative="", strengths="half", seed=1, steps=2,
                  cfg=7.0, width=64, height=64, lora_name="village.safetensors")


def test_strength_grid_scores_each_strength_with_the_captioners_clip(pack, comfy, demo_folder, tiny_coca,
                                                                    monkeypatch):
    from safetensors.torch import save_file

    save_file({"lora_unet_x.alpha": torch.tensor(4.0)}, str(comfy.base / "models" / "loras" / "village.safetensors"),
              metadata={"modelspec.trigger_phrase": "xyzvillage"})
    model, clip = comfy_stubs.ModelPatcher(None), comfy_stubs.CLIP({}, set())
    node = pack.NODE_CLASS_MAPPINGS["LoraTrainerStrengthGrid"]()
    args = dict(model=model, clip=clip, vae=comfy_stubs.VAE({}), prompt="xyzvillage, rain", negative="",
                strengths="0.5,0.8", seed=1, steps=2, cfg=7.0, width=64, height=64,
                trained_lora="village.safetensors", reference_dir=str(demo_folder))
    # without the CoCa weights: the grid as before, and why scoring was skipped, in the node's words
    grid, scores, best = node.grid(**args)["result"]
    assert "scoring skipped" in scores and "models" in scores and '"clip_weights"' in scores and best == 0.5
    assert grid.shape == (1, 64 + 24, 2 * 64, 3)

    config, weights, _ = tiny_coca
    grid_node = sys.modules[f"{comfy_stubs.PACK}.comfy_nodes.grid_node"]
    monkeypatch.setattr(grid_node, "SCORE_MODEL", str(config))
    folder = comfy.base / "models" / "lora_trainer" / "captioner"
    folder.mkdir(parents=True)
    (folder / "tiny.safetensors").write_bytes(weights.read_bytes())
    comfy.sampled.clear()
    first = node.grid(clip_weights="tiny.safetensors", **args)
    grid, scores, best = first["result"]
    assert comfy.sampled == [0, 0.5, 0.8]  # the base is rendered as the fidelity reference, not shown
    assert grid.shape == (1, 64 + 24, 2 * 64, 3) and best in (0.5, 0.8)
    lines = scores.splitlines()
    assert lines[0].split() == ["strength", "style", "fidelity", "combined"] and "best" in scores
    assert node.grid(clip_weights="tiny.safetensors", **args)["result"][1:] == (scores, best)  # repeatable


def test_example_workflows_match_the_nodes(pack, comfy):
    import json

    folder = ROOT / "example_workflows"
    api = json.loads((folder / "api" / "caption_train_sample.json").read_text(encoding="utf-8"))
    ui = json.loads((folder / "caption_train_sample.json").read_text(encoding="utf-8"))
    # ComfyUI lists every JSON directly in example_workflows/ as a template, with <name>.jpg as its picture; each has
    # its POST /prompt twin in api/ with the same nodes (but the frontend's Notes) and links
    templates = sorted(folder.glob("*.json"))
    assert [t.name for t in templates] == ["caption_train_sample.json", "flux_train_sample.json",
                                           "merge_lora_into_checkpoint.json"]
    for template in templates:
        graph = json.loads(template.read_text(encoding="utf-8"))
        assert {"nodes", "links", "version"} <= set(graph), f"{template.name} is not an editor graph"
        assert template.with_suffix(".jpg").is_file(), f"{template.name} has no thumbnail"
        twin = json.loads((folder / "api" / template.name).read_text(encoding="utf-8"))
        assert sorted(n["type"] for n in graph["nodes"] if n["type"] != "Note") == \
            sorted(n["class_type"] for n in twin.values())
        assert len(graph["links"]) == sum(isinstance(v, list) for n in twin.values() for v in n["inputs"].values())
    merge = json.loads((folder / "api" / "merge_lora_into_checkpoint.json").read_text(encoding="utf-8"))
    assert [n["class_type"] for n in merge.values()] == ["CheckpointLoaderSimple", "LoraLoader", "CheckpointSave"]
    flux = json.loads((folder / "api" / "flux_train_sample.json").read_text(encoding="utf-8"))
    ours = [n for graph in (api, flux) for n in graph.values() if n["class_type"] in pack.NODE_CLASS_MAPPINGS]
    # every node is in an example graph, but Compare LoRAs (no template yet: tests/test_comfy_compare.py runs it)
    assert {n["class_type"] for n in ours} == set(pack.NODE_CLASS_MAPPINGS) - {"LoraTrainerCompare"}
    trainer = next(n for n in flux.values() if n["class_type"] == "LoraTrainerTrainFlux")
    loaders = {nid: n["class_type"] for nid, n in flux.items()}
    assert [loaders[trainer["inputs"][k][0]] for k in ("model", "clip", "vae")] == ["UNETLoader", "DualCLIPLoader",
                                                                                     "VAELoader"]
    assert all(trainer["inputs"][k] == "(from inputs)" for k in ("unet_name", "clip_l_name", "t5xxl_name", "vae_name"))
    sampler = next(n for n in flux.values() if n["class_type"] == "KSampler")
    assert sampler["inputs"]["model"] == [next(k for k, n in flux.items() if n is trainer), 0]  # the LoRA applied
    for node in ours:
        spec = pack.NODE_CLASS_MAPPINGS[node["class_type"]].INPUT_TYPES()
        assert set(spec["required"]) <= set(node["inputs"]) <= set(spec["required"]) | set(spec.get("optional", {}))
    assert {n["type"] for n in ui["nodes"]} == {n["class_type"] for n in api.values()}
    assert len(ui["links"]) == sum(isinstance(v, list) for n in api.values() for v in n["inputs"].values())


def test_train_from_a_checkpoint_name(pack, comfy, tiny_sd1_file, demo_folder, config_file):
    import shutil

    shutil.copy(tiny_sd1_file, comfy.base / "models" / "checkpoints" / "tiny.safetensors")
    node = pack.NODE_CLASS_MAPPINGS["LoraTrainerTrain"]()
    assert "tiny.safetensors" in node.INPUT_TYPES()["optional"]["ckpt_name"][0]
    with torch.inference_mode():
        out = node.train(ckpt_name="tiny.safetensors", **train_inputs(demo_folder, config_file, steps=1))
    model_out, clip_out, name, _, _ = out["result"]
    assert name == "village.safetensors" and model_out.patches and clip_out.patches
    assert not any("force_patch_weights" in c for c in comfy.calls)  # the graph's weights were not used


def test_caption_folder_cancel_keeps_the_captions_written(pack, comfy, demo_folder):
    from lora_scripts_pack.lora_trainer.data.captions import CaptionOptions, read_captions

    (demo_folder / "metadata.csv").unlink()
    node = pack.NODE_CLASS_MAPPINGS["LoraTrainerCaptionFolder"]()
    node.captioner = FakeCaptioner(CaptionOptions(trigger="xyz", batch_size=2))
    comfy.interrupt_at_step = 2
    with pytest.raises(comfy_stubs.InterruptProcessingException):
        node.caption(folder=str(demo_folder), trigger_word="xyz", model="coca_ViT-B-32", overwrite=False)
    assert len(read_captions(demo_folder).captions) == 2


def test_train_node_plans_memory_on_cuda_and_shows_the_plan(pack, comfy, tiny_sd1, tiny_sd1_file, demo_folder,
                                                            config_file, monkeypatch, tmp_path):
    train_node = sys.modules[f"{comfy_stubs.PACK}.comfy_nodes.train_node"]
    host = sys.modules[f"{comfy_stubs.PACK}.comfy_nodes.host"]
    args = (str(demo_folder), "village", 4, 4.0, 2, 1e-3, 64, 2, 0)
    with monkeypatch.context() as patch:  # on a GPU the node fits the run to the free VRAM unless told otherwise
        patch.setattr(torch.cuda, "is_available", lambda: True)
        assert train_node.node_config(*args, config_file, train_node.FROM_GRAPH).memory_budget_gb == "auto"
        off = tmp_path / "off.yaml"
        off.write_text("memory_budget_gb: 'off'\n", encoding="utf-8")
        assert train_node.node_config(*args, str(off), train_node.FROM_GRAPH).memory_budget_gb == "off"
    assert train_node.node_config(*args, config_file, train_node.FROM_GRAPH).memory_budget_gb == "0"  # CPU

    model, clip, vae = comfy_stubs.graph_models(tiny_sd1_file, tiny_sd1)
    with torch.inference_mode():
        weights = host.graph_weights(model, clip, vae)
    assert type(weights).__name__ == "HandedOver"  # the copy becomes the training copy, not copied again
    budget = tmp_path / "budget.yaml"
    budget.write_text(open(config_file).read() + "memory_budget_gb: 1000\n", encoding="utf-8")
    node = pack.NODE_CLASS_MAPPINGS["LoraTrainerTrain"]()
    with torch.inference_mode():
        out = node.train(model=model, clip=clip, vae=vae, **train_inputs(demo_folder, str(budget)))
    plan = [line for line in out["ui"]["text"][0].splitlines() if line.startswith("memory plan on cpu")]
    assert plan and "budget 1000.0 GB; no change needed" in plan[0]


def test_check_dataset_reports_findings_with_fixes_and_passes_the_folder_on(pack, comfy, demo_folder):
    import shutil

    shutil.copy(demo_folder / "img001.png", demo_folder / "img001 copy.png")
    (demo_folder / "img000.png").write_bytes((demo_folder / "img002.png").read_bytes()[:200])  # truncated
    node = pack.NODE_CLASS_MAPPINGS["LoraTrainerCheckDataset"]()
    out = node.check(folder=f" {demo_folder} ", trigger_word="", unique_id="5")
    path, text = out["result"]
    assert path == str(demo_folder) and out["ui"]["text"] == [text]
    assert "unreadable" in text and "img000.png" in text and "duplicate" in text and "img001 copy.png" in text
    assert "fix:" in text and "usable" in text and comfy.progress[-1][0] == comfy.progress[-1][1]
    cls = pack.NODE_CLASS_MAPPINGS["LoraTrainerCheckDataset"]
    assert comfy_is_changed(cls, {"folder": str(demo_folder)}, {"folder"}) == \
        comfy_is_changed(cls, {"folder": str(demo_folder)}, {"folder"})
    with pytest.raises(Exception, match=r"^folder not found"):  # the node's own input name, not train_data_dir
        node.check(folder=str(demo_folder / "nope"), trigger_word="")


def test_train_node_logs_the_doctor_and_names_its_own_inputs(pack, comfy, tiny_sd1, tiny_sd1_file, demo_folder,
                                                             config_file, capsys):
    model, clip, vae = comfy_stubs.graph_models(tiny_sd1_file, tiny_sd1)
    node = pack.NODE_CLASS_MAPPINGS["LoraTrainerTrain"]()
    with torch.inference_mode():
        out = node.train(model=model, clip=clip, vae=vae, **train_inputs(demo_folder, config_file, steps=1))
    log = capsys.readouterr().out
    dataset_line = next(line for line in log.splitlines() if "dataset: " in line)
    assert "8 images, 8 usable" in dataset_line and log.index("dataset: ") < log.index("training 1 steps")
    assert "dataset: 8 images, 8 usable" in out["ui"]["text"][0]
    with pytest.raises(Exception, match=r"^dataset_path not found"):
        node.train(model=model, clip=clip, vae=vae, **train_inputs(demo_folder / "nope", config_file))


def test_caption_folder_lists_weights_in_models_and_says_where_to_put_them(pack, comfy, demo_folder):
    caption = pack.NODE_CLASS_MAPPINGS["LoraTrainerCaptionFolder"]
    folder = comfy.base / "models" / "lora_trainer" / "captioner"
    assert caption.INPUT_TYPES()["optional"]["weights"][0] == ["(auto)"]
    (folder / "coca").mkdir(parents=True)
    (folder / "coca" / "open_clip_model.safetensors").write_bytes(b"")
    choices = caption.INPUT_TYPES()["optional"]["weights"][0]
    assert choices == ["(auto)", "coca/open_clip_model.safetensors"]

    (demo_folder / "metadata.csv").unlink()
    from lora_scripts_pack.lora_trainer.errors import CaptionError

    with pytest.raises(CaptionError) as err:  # no weights in any cache: the message is in the node's words
        caption().caption(folder=str(demo_folder), trigger_word="", model="coca_ViT-B-32", overwrite=False)
    assert str(folder) in str(err.value) and '"weights"' in str(err.value) and "--pretrained" not in str(err.value)


def test_train_node_shows_the_validation_loss(pack, comfy, tiny_sd1, tiny_sd1_file, demo_folder, config_file):
    model, clip, vae = comfy_stubs.graph_models(tiny_sd1_file, tiny_sd1)
    validated = Path(config_file).with_name("val.yaml")
    validated.write_text(Path(config_file).read_text(encoding="utf-8") + "validation_split: 0.25\n", encoding="utf-8")
    node = pack.NODE_CLASS_MAPPINGS["LoraTrainerTrain"]()
    with torch.inference_mode():
        out = node.train(model=model, clip=clip, vae=vae, **train_inputs(demo_folder, str(validated)))
    assert ", validation loss " in out["ui"]["text"][0].splitlines()[1]
    from lora_scripts_pack.lora_trainer.evaluate.loss_plot import VALIDATION

    orange = torch.tensor([int(VALIDATION[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    assert ((out["result"][3][0] - orange).abs().sum(-1) < 0.05).any()  # the curve shows the validation points
