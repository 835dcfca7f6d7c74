"""The model stage: every source form loads the same weights, errors say what to fix, configs are the real ones.

Tiny random models only (tests/conftest.py); the single files are written by tests/ldm_layout.py,
a table-driven converter independent of the loader's (diffusers') conversion.
"""

from __future__ import annotations

import copy
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ldm_layout import TEXT_PREFIXES, components_to_ldm, save_diffusers_folder, save_ldm_file

from lora_trainer.errors import ModelError
from lora_trainer.model import build_tiny_components, detect_family, encode_text, load_components, unet_added_cond

CAPTIONS = ["a photo of a cyberpunk lab", "Lingnan arcade street, rain; ink-wash village!"]
ROOT = Path(__file__).resolve().parents[1]


def outputs(components) -> dict[str, torch.Tensor]:
    """UNet prediction, VAE encoding and text embeddings on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    latents = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        hidden, pooled = encode_text(components, CAPTIONS)
        added = unet_added_cond(components, pooled, (64, 64), (0, 0), [(64, 64), (64, 64)])
        pred = components.unet(latents, torch.tensor([10, 900]), encoder_hidden_states=hidden,
                               added_cond_kwargs=added).sample
        latent = components.vae.encode(image).latent_dist.mean
    out = {"unet": pred, "vae": latent, "text": hidden}
    if pooled is not None:
        out["pooled"] = pooled
    return out


def assert_same_outputs(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for key, want in a.items():
        got = b[key]
        assert want.shape == got.shape, key
        assert torch.allclose(want, got, atol=atol, rtol=1e-4), f"{key}: max diff {(want - got).abs().max()}"


@pytest.fixture(scope="module")
def tiny(tiny_sd1, tiny_sd2, tiny_sdxl):
    return {"sd1": tiny_sd1, "sd2": tiny_sd2, "sdxl": tiny_sdxl}


@pytest.fixture
def tiny_file(request, tiny, tmp_path):
    """The session's single file for sd1/sdxl (tests those fixtures too), a fresh one for sd2."""
    family = request.param
    if family == "sd2":
        return save_ldm_file(tiny[family], tmp_path / "tiny-sd2.safetensors")
    return request.getfixturevalue(f"tiny_{family}_file")


# --- one set of weights, three source forms ---------------------------------------------------


@pytest.mark.parametrize(("family", "tiny_file"), [(f, f) for f in ("sd1", "sd2", "sdxl")], indirect=["tiny_file"])
def test_file_state_dict_and_folder_load_the_same_model(family, tiny, tiny_file, tmp_path):
    ref, file = tiny[family], tiny_file
    expected = outputs(ref)
    folder = save_diffusers_folder(ref, tmp_path / "diffusers")
    pt = "epsilon" if family == "sd2" else "auto"  # the SD2 v-probe is meaningless on random weights
    for source in (file, components_to_ldm(ref), folder):
        loaded = load_components(source, prediction_type=pt)
        assert loaded.family == family
        assert len(loaded.text_encoders) == len(loaded.tokenizers) == (2 if family == "sdxl" else 1)
        assert loaded.prediction_type == loaded.noise_scheduler.config.prediction_type == "epsilon"
        assert all(p.dtype == torch.float32 for m in loaded.models() for p in m.parameters())
        assert_same_outputs(expected, outputs(loaded))
        if source is file:
            assert (loaded.name, loaded.source) == (f"tiny-{family}", str(file))
            assert loaded.resolved_hash() == hashlib.sha256(file.read_bytes()).hexdigest()


def test_host_state_dict_is_copied_not_shared(tiny_sd1):
    """A1111 hands over its live weights (with its `wrapped` text encoder): training must never change them."""
    sd = {k.replace("cond_stage_model.", "cond_stage_model.wrapped.", 1): v
          for k, v in components_to_ldm(tiny_sd1).items()}
    key = "model.diffusion_model.out.2.bias"
    before = sd[key].clone()
    loaded = load_components(sd, name="host-model")
    assert (loaded.name, loaded.source) == ("host-model", "<in-memory>")
    with torch.no_grad():
        loaded.unet.conv_out.bias.add_(1.0)
    assert torch.equal(sd[key], before)
    assert loaded.model_hash == load_components(components_to_ldm(tiny_sd1)).model_hash


def test_fp16_file_loads_as_float32(tiny_sdxl, tmp_path):
    file = save_ldm_file(tiny_sdxl, tmp_path / "half.safetensors", dtype=torch.float16)
    loaded = load_components(file)
    for model in loaded.models():
        assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert_same_outputs(outputs(tiny_sdxl), outputs(loaded), atol=5e-2)


def test_deepcopy_and_to(tiny_sdxl):
    """What the fixture docs tell other tests to do: deepcopy, then change the copy."""
    copied = copy.deepcopy(tiny_sdxl).to("cpu", torch.float16)
    assert {p.dtype for m in copied.models() for p in m.parameters()} == {torch.float16}
    assert {p.dtype for m in tiny_sdxl.models() for p in m.parameters()} == {torch.float32}
    assert copied.tokenizers[1]("a cat").input_ids == tiny_sdxl.tokenizers[1]("a cat").input_ids


def test_dtype_argument(tiny_sd1_file):
    loaded = load_components(tiny_sd1_file, dtype=torch.bfloat16)
    assert {p.dtype for m in loaded.models() for p in m.parameters()} == {torch.bfloat16}


# --- detection ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_detect_family(family, tiny):
    keys = list(components_to_ldm(tiny[family]))
    assert detect_family(keys) == family
    wrapped = keys
    for prefix in TEXT_PREFIXES[family]:  # A1111 wraps each text encoder: cond_stage_model.wrapped.transformer...
        head, tail = prefix.rstrip(".").rsplit(".", 1)
        wrapped = [k.replace(prefix, f"{head}.wrapped.{tail}.", 1) for k in wrapped]
    assert wrapped != keys and detect_family(wrapped) == family


def test_detect_family_refuses_what_it_cannot_train():
    with pytest.raises(ModelError, match="refiner"):
        detect_family(["conditioner.embedders.0.model.transformer.resblocks.0.ln_1.weight",
                       "model.diffusion_model.label_emb.0.0.weight"])
    with pytest.raises(ModelError, match="model_family"):
        detect_family(["model.diffusion_model.input_blocks.0.0.weight"])
    with pytest.raises(ModelError, match="SD 1.x, SD 2.x") as err:
        detect_family(["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"])
    assert "lora_unet_down" in str(err.value)


def test_family_override_and_mismatch(tiny_sd1, tmp_path):
    folder = save_diffusers_folder(tiny_sd1, tmp_path / "sd1")
    with pytest.raises(ModelError, match="set it to auto"):
        load_components(folder, family="sdxl")
    with pytest.raises(ModelError, match="model_family"):
        load_components(folder, family="sd3")


# --- prediction type ------------------------------------------------------------------------


def test_prediction_type_sources(tiny_sd1, tiny_sd2, tmp_path):
    v_file = save_ldm_file(tiny_sd1, tmp_path / "v.safetensors", extra={"v_pred": torch.tensor([])})
    loaded = load_components(v_file)
    assert loaded.prediction_type == loaded.noise_scheduler.config.prediction_type == "v_prediction"
    markers = {"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}  # NoobAI-style v-pred + zero terminal SNR
    loaded = load_components({**components_to_ldm(tiny_sd1), **markers}, prediction_type="epsilon")
    assert loaded.prediction_type == "epsilon" and loaded.noise_scheduler.config.rescale_betas_zero_snr
    probed = load_components(components_to_ldm(tiny_sd2))  # SD2 without a marker: A1111's probe decides
    assert probed.prediction_type in ("epsilon", "v_prediction")
    with pytest.raises(ModelError, match="prediction_type"):
        load_components(v_file, prediction_type="sample")


def test_folder_scheduler_decides_prediction_type(tiny_sd2, tmp_path):
    folder = save_diffusers_folder(tiny_sd2, tmp_path / "sd2-768-v")
    cfg = folder / "scheduler" / "scheduler_config.json"
    cfg.write_text(cfg.read_text().replace('"epsilon"', '"v_prediction"'))
    assert load_components(folder).prediction_type == "v_prediction"


# --- bad input ------------------------------------------------------------------------------


def test_missing_file_says_where_to_put_it(tmp_path):
    path = tmp_path / "models" / "v1-5-pruned.safetensors"
    with pytest.raises(ModelError) as err:
        load_components(path)
    assert str(path) in str(err.value) and "models/Stable-diffusion" in str(err.value)


def test_ckpt_refused_unless_allowed(tiny_sd1, tmp_path):
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": components_to_ldm(tiny_sd1), "global_step": 470000}, path)
    with pytest.raises(ModelError, match="allow_ckpt"):
        load_components(path)
    loaded = load_components(path, allow_ckpt=True)
    assert_same_outputs(outputs(tiny_sd1), outputs(loaded))


def test_unreadable_sources(tiny_sd1_file, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(tiny_sd1_file.read_bytes()[:5000])
    with pytest.raises(ModelError, match="damaged"):
        load_components(broken)
    with pytest.raises(ModelError, match="diffusers"):
        load_components(tmp_path)  # a folder, but not a model
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelError, match=".safetensors"):
        load_components(tmp_path / "notes.txt")


def test_incomplete_or_foreign_checkpoints(tiny_sd1):
    sd = components_to_ldm(tiny_sd1)
    del sd["model.diffusion_model.out.2.weight"]
    with pytest.raises(ModelError, match="UNet is incomplete"):
        load_components(sd)
    sd = components_to_ldm(tiny_sd1)
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 9, 3, 3)  # an inpainting UNet
    with pytest.raises(ModelError, match="inpainting"):
        load_components(sd)
    sd = {k: v for k, v in components_to_ldm(tiny_sd1).items() if not k.startswith("first_stage_model.")}
    with pytest.raises(ModelError, match="VAE"):
        load_components(sd)


# --- conditioning and tokenizers --------------------------------------------------------------


def test_conditioning_shapes(tiny_sd1, tiny_sdxl):
    hidden, pooled = encode_text(tiny_sd1, CAPTIONS)
    assert hidden.shape == (2, 77, 32) and pooled is None
    assert unet_added_cond(tiny_sd1, pooled, (64, 64), (0, 0), (64, 64)) is None
    hidden, pooled = encode_text(tiny_sdxl, CAPTIONS)
    assert hidden.shape == (2, 77, 64) and pooled.shape == (2, 32)
    added = unet_added_cond(tiny_sdxl, pooled, [(768, 1024), (512, 512)], (0, 16), torch.tensor([[64, 64]]))
    assert added["text_embeds"] is pooled
    assert added["time_ids"].tolist() == [[768, 1024, 0, 16, 64, 64], [512, 512, 0, 16, 64, 64]]


def test_tokenizers_match_open_clip(tiny_sd2, tiny_sdxl):
    open_clip = pytest.importorskip("open_clip")
    reference = open_clip.get_tokenizer("ViT-L-14")
    # no "!" here: with "!" as pad token, transformers splits it out as a special token (as in the
    # diffusers SD2/SDXL pipelines), where open_clip would merge "!!"
    sentences = ["a photo of a cat", "Cyberpunk lab, neon lights; rain 1girl's   umbrella",
                 "ink-wash village, 水墨 café", ""]
    tok_l, tok_g = tiny_sdxl.tokenizers
    for text in sentences:
        want = reference([text])[0].tolist()
        n = want.index(49407) + 1
        got = tok_l(text, padding="max_length", max_length=77).input_ids
        assert got[:n] == want[:n] and set(got[n:]) <= {49407}  # CLIP-L pads with <|endoftext|>
        got = tok_g(text, padding="max_length", max_length=77).input_ids
        assert got == want  # OpenCLIP pads with "!" = 0, as open_clip does
    assert tiny_sd2.tokenizers[0].pad_token == "!"


# --- configs and import cost ----------------------------------------------------------------


def test_shipped_configs_are_the_released_architectures():
    """Parameter counts of SD1.5, SD2.1 and SDXL base 1.0 (built on the meta device: no memory, no init)."""
    from lora_trainer.model import factory, shipped

    counts = {"sd1": [859_520_964, 83_653_863, 123_060_480], "sd2": [865_910_724, 83_653_863, 340_387_840],
              "sdxl": [2_567_463_684, 83_653_863, 123_060_480, 694_659_840]}
    for family, want in counts.items():
        configs = shipped.load_configs(family)
        models = [factory.build_unet(configs["unet"], empty=True), factory.build_vae(configs["vae"], empty=True)]
        models += [factory.build_text_encoder(configs[p], empty=True) for p in shipped.text_encoder_parts(family)]
        assert [sum(p.numel() for p in m.parameters()) for m in models] == want, family


def test_tiny_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a, b = build_tiny_components("sd1", seed=3), build_tiny_components("sd1", seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a.model_hash == b.model_hash
    assert a.model_hash != build_tiny_components("sd1", seed=4).model_hash


def test_import_loads_nothing_heavy():
    code = ("import sys, lora_trainer.model; heavy = {'diffusers', 'transformers', 'open_clip'} & set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
