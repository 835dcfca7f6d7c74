"""The Train Flux LoRA node, called as ComfyUI calls it, with Flux's four files in ComfyUI's model folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import comfy_stubs
from flux_files import write_tiny_flux

pytestmark = [pytest.mark.comfy, pytest.mark.flux]

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def comfy(tmp_path):
    files = write_tiny_flux(tmp_path / "downloads", "dev")
    state = comfy_stubs.install(tmp_path / "comfy")
    try:  # the stand-ins leave sys.modules whatever happens: later tests import the pack without ComfyUI
        models = tmp_path / "comfy" / "models"
        for key, folder in (("base_model", "diffusion_models"), ("clip_l", "text_encoders"),
                            ("t5xxl", "text_encoders"), ("vae", "vae")):
            shutil.copy(files[key], models / folder / Path(files[key]).name)
        shutil.copytree(files["t5_tokenizer"], tmp_path / "comfy" / "comfy" / "text_encoders" / "t5_tokenizer")
        yield state
    finally:
        comfy_stubs.uninstall()


def flux_inputs(demo_folder, config_file, **changes):
    values = dict(dataset_path=str(demo_folder), lora_name="poster", unet_name="tiny-flux-dev.safetensors",
                  clip_l_name="clip_l.safetensors", t5xxl_name="t5xxl_fp16.safetensors", vae_name="ae.safetensors",
                  rank=4, alpha=4.0, steps=2, learning_rate=1e-3, resolution=64, batch_size=2, seed=0,
                  config_file=config_file)
    values.update(changes)
    return values


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "flux.yaml"
    path.write_text("device: cpu\nmin_bucket_reso: 64\nmax_bucket_reso: 128\n", encoding="utf-8")
    return str(path)


def test_the_node_lists_the_files_comfyui_has_and_trains_a_flux_lora_into_models_loras(comfy, demo_folder,
                                                                                       config_file):
    pack = comfy_stubs.load_pack(ROOT)
    cls = pack.NODE_CLASS_MAPPINGS["LoraTrainerTrainFlux"]
    required = cls.INPUT_TYPES()["required"]
    assert required["unet_name"][0] == ["(from inputs)", "tiny-flux-dev.safetensors"]
    assert required["clip_l_name"][0] == ["(from inputs)", "clip_l.safetensors", "t5xxl_fp16.safetensors"]
    assert required["vae_name"][0] == ["(from inputs)", "ae.safetensors"] and required["resolution"][1]["step"] == 16
    assert {"model", "clip", "vae"} <= set(cls.INPUT_TYPES()["optional"])
    with torch.inference_mode():  # ComfyUI runs nodes under inference_mode: training must still work
        out = cls().train(**flux_inputs(demo_folder, config_file))
    model_out, name, curve, report = out["result"]
    assert model_out is None  # the transformer came from a file: LoraLoaderModelOnly loads the LoRA
    lora = comfy.base / "models" / "loras" / name
    assert name == "poster.safetensors" and lora.is_file() and out["ui"]["text"] == [report]
    assert report.startswith("saved poster.safetensors in models/loras\n2 steps, final loss ")
    with safe_open(str(lora), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith(("lora_unet_double_blocks_0_", "lora_unet_single_blocks_0_")) for k in keys)
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert "unload_all_models" in comfy.calls and comfy.progress[-1] == (2, 2)
    assert curve.shape[-1] == 3


def test_a_file_the_node_cannot_find_names_the_input(comfy, demo_folder, config_file):
    pack = comfy_stubs.load_pack(ROOT)
    node = pack.NODE_CLASS_MAPPINGS["LoraTrainerTrainFlux"]()
    (comfy.base / "comfy" / "text_encoders" / "t5_tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(Exception, match="T5's tokenizer"):
        node.train(**flux_inputs(demo_folder, config_file))
    with pytest.raises(Exception, match="dataset_path not found"):
        node.train(**flux_inputs(demo_folder / "nope", config_file))


def test_the_node_trains_on_the_graph_s_flux_model_clip_and_vae(comfy, tmp_path, demo_folder, config_file):
    """UNETLoader + DualCLIPLoader + VAELoader into the node, every name left at (from inputs): the same LoRA as
    from the same files on disk; a part picked as a file is read from disk while the rest come from the graph."""
    from safetensors.torch import load_file

    pack = comfy_stubs.load_pack(ROOT)
    node = pack.NODE_CLASS_MAPPINGS["LoraTrainerTrainFlux"]()
    models = comfy.base / "models"
    graph = comfy_stubs.flux_graph_models({"base_model": models / "diffusion_models" / "tiny-flux-dev.safetensors",
                                           "clip_l": models / "text_encoders" / "clip_l.safetensors",
                                           "t5xxl": models / "text_encoders" / "t5xxl_fp16.safetensors",
                                           "vae": models / "vae" / "ae.safetensors"})
    from_graph = dict(unet_name="(from inputs)", clip_l_name="(from inputs)", t5xxl_name="(from inputs)",
                      vae_name="(from inputs)")
    model, clip, vae = graph
    with torch.inference_mode():
        files = node.train(**flux_inputs(demo_folder, config_file, lora_name="disk"))["result"][1]
        wired_model, wired = node.train(**flux_inputs(demo_folder, config_file, lora_name="wired", **from_graph),
                                        model=model, clip=clip, vae=vae)["result"][:2]
        mixed = node.train(**flux_inputs(demo_folder, config_file, lora_name="mixed",
                                         **dict(from_graph, vae_name="ae.safetensors")), model=model, clip=clip)
    loras = models / "loras"
    a, b, c = (load_file(str(loras / n)) for n in (files, wired, mixed["result"][1]))
    # the MODEL output: the graph's model with every module of the new file applied by ComfyUI's loader
    assert wired_model is not model and wired_model.patches[-1] == (1.0, sorted({k.split(".")[0] for k in b}))
    assert set(a) == set(b) == set(c) and all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    assert any(c.startswith("load_models_gpu") for c in comfy.calls)  # the graph's weights gathered as CheckpointSave does


def test_a_part_from_inputs_without_its_input_names_the_loader(comfy, demo_folder, config_file):
    pack = comfy_stubs.load_pack(ROOT)
    node = pack.NODE_CLASS_MAPPINGS["LoraTrainerTrainFlux"]()
    with pytest.raises(Exception, match=r"unet_name is \(from inputs\): connect the MODEL input \(UNETLoader\)"):
        node.train(**flux_inputs(demo_folder, config_file, unet_name="(from inputs)"))
    with pytest.raises(Exception, match=r"CLIP or VAE \(from inputs\) come with the graph's MODEL"):
        node.train(**flux_inputs(demo_folder, config_file, vae_name="(from inputs)"), vae=object())
