"""Compare LoRAs (lora-scripts), called as ComfyUI calls it, against the stand-in ComfyUI modules (comfy_stubs.py):
rows × strengths on the graph's model, the table, and the one-line refusals of bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import comfy_stubs

pytestmark = pytest.mark.comfy

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def pack():
    return comfy_stubs.load_pack(ROOT)


@pytest.fixture
def comfy(tmp_path, tiny_sd1):
    state = comfy_stubs.install(tmp_path / "comfy", tiny_sd1)
    yield state
    comfy_stubs.uninstall()


def compare(pack, **inputs):
    """The node called with the graph's MODEL/CLIP/VAE as stand-ins; returns (output, model, clip)."""
    model, clip = comfy_stubs.ModelPatcher(None), comfy_stubs.CLIP({}, set())
    values = dict(model=model, clip=clip, vae=comfy_stubs.VAE({}), loras="", run_folder="", prompt="xyz, rain",
                  negative="", strengths="0,0.5,1", seed=3, steps=2, cfg=7.0, width=64, height=64)
    values.update(inputs)
    return pack.NODE_CLASS_MAPPINGS["LoraTrainerCompare"]().compare(**values), model, clip


def grid_shape(rows: int, strengths: list, seed: int = 3, size: int = 64) -> tuple:
    """The IMAGE shape label_grid gives rows × strengths pictures of `size` px."""
    from lora_trainer.evaluate.sample import label_grid

    blank = [[Image.new("RGB", (size, size))] * len(strengths) for _ in range(rows)]
    grid = label_grid(blank, [f"strength {s:g}" for s in strengths], ["row"] * rows, seed)
    return (1, grid.height, grid.width, 3)


def lora(path: Path, **metadata: str) -> Path:
    """A LoRA file the way the strength grid's tests write one: the stand-in sampler reads only the strength."""
    save_file({"lora_unet_x.alpha": torch.tensor(4.0), "lora_te_y.alpha": torch.tensor(4.0)}, str(path),
              metadata=metadata)
    return path


def test_two_loras_are_two_rows_and_the_table_reads_their_metadata(pack, comfy, tmp_path):
    lora(comfy.base / "models" / "loras" / "village.safetensors", ss_network_module="networks.lora",
         ss_network_dim="4", ss_network_alpha="4.0", **{"lora_trainer.val_loss": "0.1234"})
    other = lora(tmp_path / "elsewhere.safetensors", ss_network_module="lycoris.kohya", ss_network_dim="8",
                 ss_network_alpha="1", ss_network_args='{"algo": "lora", "dora_wd": "True"}')
    out, model, clip = compare(pack, loras=f"village\n\n  {other}  \n")  # a name without .safetensors, a path
    grid, text = out["result"]
    assert out["ui"]["text"] == [text]
    assert grid.shape == grid_shape(2, [0, 0.5, 1]) and 0 <= grid.min() and grid.max() <= 1
    # strength 0 is the graph's model alone: rendered once, reused in the second row
    assert comfy.sampled == [0, 0.5, 1, 0.5, 1]
    assert model.patches == [] and clip.patches == []  # each row's LoRA went on clones, never on the graph's model
    lines = text.splitlines()
    assert lines[0].split() == ["lora", "type", "rank", "alpha", "val_loss"]
    assert lines[1].split() == ["village", "LoRA", "4", "4", "0.1234"]
    assert lines[2].split() == ["elsewhere", "DoRA", "8", "1", "—"]
    assert lines[3] == "lowest validation loss: village (of the files that record one)"
    cls = pack.NODE_CLASS_MAPPINGS["LoraTrainerCompare"]
    before = cls.IS_CHANGED(loras=f"village\n{other}", run_folder="")
    assert cls.IS_CHANGED(loras=f"village\n{other}", run_folder="") == before
    lora(other, ss_network_dim="16")  # written again under its name: the node renders again
    assert cls.IS_CHANGED(loras=f"village\n{other}", run_folder="") != before
    assert isinstance(cls.IS_CHANGED(loras="not there", run_folder="/nor/here"), str)  # never raises


def _run_config(demo_folder, tiny_sd1_file, out):
    """tests/test_experiments.py's tiny run: 4 steps, a checkpoint every 2, a validation split."""
    from lora_trainer.config import TrainConfig

    return TrainConfig(train_data_dir=str(demo_folder), base_model=str(tiny_sd1_file), resolution=64,
                       min_bucket_reso=64, max_bucket_reso=128, lora_rank=4, lora_alpha=4, batch_size=2,
                       learning_rate=1e-2, seed=0, device="cpu", output_dir=str(out), output_name="style",
                       max_train_steps=4, save_steps=2, validation_split=0.25, validation_timesteps=2,
                       save_precision="fp32", sample_steps=2)


def test_a_run_folder_gives_its_checkpoints_and_the_compare_table(pack, comfy, demo_folder, tiny_sd1_file):
    from lora_trainer.training.loop import train

    result = train(_run_config(demo_folder, tiny_sd1_file, comfy.base / "output" / "lora_trainer" / "style"))
    cls = pack.NODE_CLASS_MAPPINGS["LoraTrainerCompare"]
    before = cls.IS_CHANGED(loras="", run_folder="style")
    out, model, _ = compare(pack, run_folder="style", strengths="0,1")  # a name alone: output/lora_trainer/<name>
    grid, text = out["result"]
    # rows: the checkpoints of step 2 and step 4, and the finished LoRA; columns: the 2 strengths
    assert grid.shape == grid_shape(3, [0, 1])
    assert comfy.sampled == [0, 1, 1, 1] and model.patches == []
    assert "best by validation loss: style" in text and text.splitlines()[0].split()[:3] == ["run", "val", "final"]
    assert compare(pack, run_folder=str(result.output_dir), strengths="0,1")[0]["result"][1] == text  # or a path
    # a run that saved another file renders again (ComfyUI re-runs the node when IS_CHANGED changes)
    assert cls.IS_CHANGED(loras="", run_folder="style") == before
    (result.output_dir / "style-step000006.safetensors").write_bytes(result.lora_path.read_bytes())
    assert cls.IS_CHANGED(loras="", run_folder="style") != before
    assert isinstance(cls.IS_CHANGED(loras=None, run_folder=None), str)  # linked inputs arrive as None


@pytest.mark.parametrize("inputs, message", [
    ({}, r"^Nothing to compare: list LoRAs in loras"),
    ({"loras": "village", "run_folder": "/somewhere"}, r"^Give loras or run_folder, not both"),
    ({"loras": "vilage"}, r"^loras: 'vilage' is not in models/loras: .* Did you mean 'village.safetensors'\?$"),
    ({"loras": "/no/such/file.safetensors"}, r"^loras: /no/such/file.safetensors not found"),
    ({"run_folder": "pictures"}, r"^run_folder: .*pictures is not a run folder \(no config.yaml"),
    ({"run_folder": "/no/such/run"}, r"^run_folder: /no/such/run is not a folder"),
    ({"loras": "village", "strengths": "half"}, r"^strengths: write numbers"),
])
def test_bad_input_is_refused_in_one_line(pack, comfy, inputs, message):
    from lora_scripts_pack.lora_trainer.errors import ConfigError

    lora(comfy.base / "models" / "loras" / "village.safetensors")
    (comfy.base / "output" / "lora_trainer" / "pictures").mkdir(parents=True)
    with pytest.raises(ConfigError, match=message) as err:
        compare(pack, **inputs)
    assert len(str(err.value).splitlines()) == 1
    assert comfy.sampled == []  # refused before anything was rendered
