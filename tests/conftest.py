"""Shared pytest fixtures.

Model fixtures (from the model stage): `tiny_sd1`, `tiny_sd2`, `tiny_sdxl` are tiny random
models built once per session with `build_tiny_components`; `tiny_sd1_file` / `tiny_sdxl_file`
are single-file `.safetensors` checkpoints (original layout) of exactly those weights.
They are SHARED by every test of the session: never train, wrap (peft), move or otherwise change
them in place. A test that changes a model takes `copy.deepcopy(tiny_sd1)` or builds its own
with `build_tiny_components(family, seed)` (about a second).
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def model_cache_dir(tmp_path_factory):
    """Point LORA_TRAINER_CACHE (derived tokenizer files, hash cache) at a per-session temp folder."""
    old = os.environ.get("LORA_TRAINER_CACHE")
    path = tmp_path_factory.mktemp("lora_trainer_cache")
    os.environ["LORA_TRAINER_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("LORA_TRAINER_CACHE", None)
    else:
        os.environ["LORA_TRAINER_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_sd1(model_cache_dir):
    """Tiny random SD1 Components (seed 0). Shared: do not mutate, deepcopy first."""
    from lora_trainer.model import build_tiny_components

    return build_tiny_components("sd1", seed=0)


@pytest.fixture(scope="session")
def tiny_sd2(model_cache_dir):
    """Tiny random SD2 Components (seed 0; OpenCLIP text encoder). Shared: do not mutate, deepcopy first."""
    from lora_trainer.model import build_tiny_components

    return build_tiny_components("sd2", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl(model_cache_dir):
    """Tiny random SDXL Components (seed 0; two text encoders). Shared: do not mutate, deepcopy first."""
    from lora_trainer.model import build_tiny_components

    return build_tiny_components("sdxl", seed=0)


@pytest.fixture(scope="session")
def tiny_sd1_file(tiny_sd1, tmp_path_factory):
    """Path of a single-file .safetensors (original LDM layout) holding `tiny_sd1`'s weights. Read-only."""
    from ldm_layout import save_ldm_file

    return save_ldm_file(tiny_sd1, tmp_path_factory.mktemp("tiny_sd1") / "tiny-sd1.safetensors")


@pytest.fixture(scope="session")
def tiny_sdxl_file(tiny_sdxl, tmp_path_factory):
    """Path of a single-file .safetensors (original SGM layout) holding `tiny_sdxl`'s weights. Read-only."""
    from ldm_layout import save_ldm_file

    return save_ldm_file(tiny_sdxl, tmp_path_factory.mktemp("tiny_sdxl") / "tiny-sdxl.safetensors")


@pytest.fixture(scope="session")
def tiny_coca(tmp_path_factory):
    """(config path, .safetensors weights, .bin weights) of a tiny random CoCa (captions.coca.TINY_COCA), made
    with open_clip: the captioner's and the strength scorer's model in tests. Read-only."""
    import json

    import open_clip
    import torch
    from safetensors.torch import save_file

    from lora_trainer.data.captions.coca import TINY_COCA, resolve_model_name

    folder = tmp_path_factory.mktemp("tiny_coca")
    config = folder / "coca_tiny_test.json"
    config.write_text(json.dumps(TINY_COCA), encoding="utf-8")
    name = resolve_model_name(str(config))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        state = {k: v.contiguous() for k, v in open_clip.create_model(name).state_dict().items()}
    save_file(state, str(folder / "tiny.safetensors"))
    torch.save(state, folder / "tiny.bin")
    return config, folder / "tiny.safetensors", folder / "tiny.bin"


# -- training fixtures (train / export / resume tests) ----------------------------------------

@pytest.fixture(scope="session", autouse=True)
def single_thread_torch():
    """Tiny models run fastest on one thread, and the suite never fights itself for 2 cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def demo_folder(tmp_path):
    """A folder of 8 generated 96 px images with a seed-format metadata.csv."""
    from lora_trainer.cli.demo_data import make_demo_images

    return make_demo_images(tmp_path / "data")


@pytest.fixture
def make_cfg(demo_folder, tmp_path):
    """Build a CPU TrainConfig for the tiny models: 64 px, rank 4, output in tmp_path/out."""
    from lora_trainer.config import TrainConfig

    def make(**overrides):
        values = dict(train_data_dir=str(demo_folder), resolution=64, min_bucket_reso=64, max_bucket_reso=128,
                      lora_rank=4, lora_alpha=4, batch_size=2, learning_rate=1e-3, seed=0, device="cpu",
                      output_dir=str(tmp_path / "out"), output_name="lora", sample_steps=2)
        values.update(overrides)
        return TrainConfig(**values)

    return make


# What each stack leaves out (pyproject.toml's markers): tests of the newest stack only, Flux on AUTOMATIC1111's.
NOT_ON_STACK = {"a1111": ("once", "comfy", "flux"), "forge": ("once", "comfy")}


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests run on a CUDA machine and skip cleanly everywhere else; a stack other than the
    newest deselects the markers NOT_ON_STACK names (they run, and count, on the newest)."""
    import torch

    left_out = NOT_ON_STACK.get(os.environ.get("LORA_TRAINER_STACK", "newest"), ())
    kept = [item for item in items if not any(m in item.keywords for m in left_out)]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
