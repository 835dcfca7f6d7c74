"""Flux.1 on tiny random files in the released layouts: load, train with rectified flow, write the kohya Flux layout."""

import copy
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from flux_files import write_tiny_flux
from lora_trainer.callbacks import Callbacks
from lora_trainer.cli.commands import main
from lora_trainer.errors import ModelError
from lora_trainer.model import encode_text, flux, load_components
from lora_trainer.training import objective
from lora_trainer.training.loop import train

pytestmark = pytest.mark.flux


@pytest.fixture(scope="module")
def flux_dev(tmp_path_factory):
    return write_tiny_flux(tmp_path_factory.mktemp("flux_dev"), "dev")


@pytest.fixture(scope="module")
def flux_schnell_all_in_one(tmp_path_factory):
    return write_tiny_flux(tmp_path_factory.mktemp("flux_aio"), "schnell", seed=3, all_in_one=True)


def parts(files):
    return {k: files[k] for k in ("clip_l", "t5xxl", "vae", "t5_tokenizer")}


@pytest.mark.parametrize("which", ["flux_dev", "flux_schnell_all_in_one"])
def test_each_layout_loads_into_diffusers_and_transformers_classes_exactly(which, request):
    files = request.getfixturevalue(which)
    comps = load_components(files["base_model"], flux_parts=parts(files))
    made = files["models"]
    assert comps.family == "flux" and comps.variant == ("dev" if which == "flux_dev" else "schnell")
    assert type(comps.unet).__name__ == "FluxTransformer2DModel"
    assert comps.unet.config.num_layers == 1 and comps.unet.config.num_single_layers == 1  # depth from the keys
    for got, want in ((comps.unet, made["transformer"]), (comps.vae, made["vae"])):
        a, b = got.state_dict(), want.state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ids = comps.tokenizers[1](["a red circle"], return_tensors="pt").input_ids
    torch.testing.assert_close(comps.text_encoders[1](ids)[0], copy.deepcopy(made["t5"]).eval().half().float()(ids)[0], rtol=0, atol=0)
    hidden, pooled = encode_text(comps, ["demo_style, a red circle"])
    assert hidden.shape == (1, 512 if comps.variant == "dev" else 256, 32) and pooled.shape == (1, 32)


def test_an_all_in_one_checkpoint_brings_its_own_encoders_and_vae(flux_schnell_all_in_one):
    files, made = flux_schnell_all_in_one, flux_schnell_all_in_one["models"]
    comps = load_components(files["base_model"], flux_parts={"t5_tokenizer": files["t5_tokenizer"]})
    for got, want in ((comps.text_encoders[1], made["t5"]), (comps.vae, made["vae"]), (comps.text_encoders[0], made["clip"])):
        a, b = got.state_dict(), want.state_dict()
        keys = {k for k in b if not k.endswith("position_ids")}
        assert keys <= set(a) and all(torch.equal(a[k], b[k]) for k in keys), type(got)
    assert comps.source == files["base_model"]


def test_a_missing_companion_file_is_named_with_where_the_hosts_keep_it(flux_dev, tmp_path):
    with pytest.raises(ModelError) as err:
        load_components(flux_dev["base_model"], flux_parts={"clip_l": flux_dev["clip_l"],
                                                            "vae": str(tmp_path / "ae.safetensors")})
    said = str(err.value)
    assert "t5xxl (t5xxl_fp16.safetensors" in said and "models/text_encoders" in said
    assert f"vae not found: {tmp_path / 'ae.safetensors'}" in said and "clip_l" not in said.split(":", 1)[1][:40]
    assert "\n" not in said


def test_a_clip_file_given_as_t5xxl_is_one_line(flux_dev):
    with pytest.raises(ModelError, match=r"clip_l\.safetensors\) has no shared\.weight: it is not a T5-XXL"):
        load_components(flux_dev["base_model"], flux_parts={**parts(flux_dev), "t5xxl": flux_dev["clip_l"]})


def test_sd_only_settings_on_a_flux_file_are_refused_naming_the_key(flux_dev):
    with pytest.raises(ModelError, match="leave model_family and prediction_type at auto"):
        load_components(flux_dev["base_model"], prediction_type="v_prediction", flux_parts=parts(flux_dev))


def flux_pipeline():
    """diffusers' FluxPipeline, the oracle of the packing; its pipelines do not import beside the transformers
    AUTOMATIC1111 1.10 pins (the a1111 stack), where the packing is checked on the other stacks."""
    try:
        from diffusers import FluxPipeline
    except (ImportError, RuntimeError) as err:
        pytest.skip(f"diffusers' FluxPipeline does not import on this stack: {str(err).splitlines()[0]}")
    return FluxPipeline


def test_packing_matches_the_flux_pipeline():
    pipeline = flux_pipeline()
    latents = torch.randn(2, 16, 8, 12)
    ours = flux.pack_latents(latents)
    torch.testing.assert_close(ours, pipeline._pack_latents(latents, 2, 16, 8, 12))
    torch.testing.assert_close(flux.unpack_latents(ours, 16, 8, 12), latents)
    ids = pipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32)  # diffusers ≥ 0.31: packed sides
    if ids.shape[-2] != 24:  # older diffusers take the latent's sides and halve them
        ids = pipeline._prepare_latent_image_ids(2, 8, 12, "cpu", torch.float32)
    torch.testing.assert_close(flux.latent_ids(8, 12, "cpu"), ids.reshape(-1, 3))


def test_timestep_sampling_draws_in_the_unit_interval_and_shift_moves_it_towards_noise(make_cfg):
    draws = {}
    for how in ("sigmoid", "shift", "uniform"):  # (flux_shift below)
        cfg = make_cfg(timestep_sampling=how, discrete_flow_shift=3.0)
        gen = torch.Generator().manual_seed(0)
        draws[how] = torch.tensor([objective.flow_time(cfg, gen) for _ in range(2000)])
        assert 0 < draws[how].min() and draws[how].max() < 1
    s = draws["sigmoid"]
    torch.testing.assert_close(draws["shift"], 3 * s / (1 + 2 * s))  # same generator, same draws, shifted
    assert draws["shift"].mean() > draws["sigmoid"].mean() + 0.1
    assert abs(float(draws["uniform"].mean()) - 0.5) < 0.03
    # flux_shift: the shift of FluxPipeline's dynamic shifting for the image's packed tokens
    for tokens, mu in ((256, 0.5), (4096, 1.15), (1024, 0.5 + 0.65 * 768 / 3840)):
        cfg, gen = make_cfg(timestep_sampling="flux_shift"), torch.Generator().manual_seed(0)
        got = torch.tensor([objective.flow_time(cfg, gen, image_tokens=tokens) for _ in range(2000)])
        shift = torch.exp(torch.tensor(mu, dtype=torch.float64)).item()
        torch.testing.assert_close(got, shift * s / (1 + (shift - 1) * s))


class Stopper(Callbacks):
    def __init__(self, at=None):
        self.steps, self.at = 0, at

    def on_loss(self, step, loss, lr):
        self.steps = step

    def should_stop(self):
        return self.at is not None and self.steps >= self.at


def flux_cfg(make_cfg, files, **overrides):
    return make_cfg(base_model=files["base_model"], **parts(files), target_modules=["attn", "ff"], **overrides)


def test_training_changes_only_the_lora_and_writes_what_comfyui_and_forge_load(flux_dev, make_cfg):
    comps = load_components(flux_dev["base_model"], flux_parts=parts(flux_dev))
    base = {k: v.clone() for k, v in comps.unet.state_dict().items()}
    result = train(flux_cfg(make_cfg, flux_dev, max_train_steps=3, guidance_scale=3.5), components=comps)
    after = comps.unet.state_dict()
    assert any("lora_" in k for k in after)
    unwrapped = {k.replace(".base_layer", ""): v for k, v in after.items() if "lora_" not in k}
    assert set(unwrapped) == set(base) and all(torch.equal(unwrapped[k], base[k]) for k in base)  # no base weight moved
    tensors = load_file(str(result.lora_path))
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert all(m.startswith(("lora_unet_double_blocks_0_", "lora_unet_single_blocks_0_")) for m in modules)
    assert "lora_unet_double_blocks_0_img_attn_qkv" in modules and "lora_unet_single_blocks_0_linear1" in modules
    with safe_open(str(result.lora_path), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["ss_base_model_version"] == "flux1"
    assert meta["ss_network_module"] == "networks.lora_flux"

    # diffusers' own reader of kohya Flux files gives each trained layer its update back
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from lora_trainer.adapters.lora import ADAPTER, lora_layers

    double = {k: v.float() for k, v in tensors.items() if k.startswith("lora_unet_double_blocks_")}
    back = _convert_kohya_flux_lora_to_diffusers(double)
    for name, layer in lora_layers(comps.unet).items():
        if not name.startswith("transformer_blocks."):
            continue
        want = layer.lora_B[ADAPTER].weight @ layer.lora_A[ADAPTER].weight * layer.scaling[ADAPTER]
        got = back[f"transformer.{name}.lora_B.weight"] @ back[f"transformer.{name}.lora_A.weight"]
        torch.testing.assert_close(got, want.detach().half().float(), rtol=2e-3, atol=2e-4, msg=name)


def test_a_stopped_flux_run_resumes_to_exactly_the_uninterrupted_lora(flux_dev, make_cfg, tmp_path):
    straight = train(flux_cfg(make_cfg, flux_dev, max_train_steps=3, save_steps=1,
                              output_dir=str(tmp_path / "straight")))
    stopped = train(flux_cfg(make_cfg, flux_dev, max_train_steps=3, save_steps=1, output_dir=str(tmp_path / "r")),
                    Stopper(at=1))
    assert stopped.stopped and stopped.steps == 1
    resumed = train(flux_cfg(make_cfg, flux_dev, max_train_steps=3, save_steps=1, output_dir=str(tmp_path / "r")),
                    resume=str(tmp_path / "r"))
    a, b = load_file(str(straight.lora_path)), load_file(str(resumed.lora_path))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_the_cli_trains_and_samples_flux_and_refuses_what_flux_cannot_do_yet(flux_dev, demo_folder, tmp_path,
                                                                                 capsys):
    config = tmp_path / "flux.yaml"
    lines = [f"train_data_dir: {demo_folder}", f"base_model: {flux_dev['base_model']}",
             *(f"{k}: {v}" for k, v in parts(flux_dev).items()), "resolution: 64", "min_bucket_reso: 64",
             "max_bucket_reso: 128", "lora_rank: 4", "batch_size: 2", "max_train_steps: 2", "device: cpu",
             f"output_dir: {tmp_path / 'out'}"]
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    # refused before the files are read: the missing clip_l is not what it says
    assert main(["train", "--config", str(config), "--set", "lora_type=dora", "--set", "clip_l="]) == 2
    assert "Flux LoRAs are trained as lora only" in capsys.readouterr().err
    assert main(["train", "--config", str(config), "--set", "resolution=72"]) == 2
    assert "multiples of 16" in capsys.readouterr().err
    assert main(["train", "--config", str(config)]) == 0
    lora = Path(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("LoRA: "))
    assert lora.is_file() and any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv") for k in load_file(str(lora)))
    flux_args = [a for k, v in parts(flux_dev).items() for a in (f"--{k.replace('_', '-')}", v)]
    sample = ["sample", "--base-model", flux_dev["base_model"], "--lora", str(lora), "--prompt", "a red circle",
              "--steps", "2", "--size", "64", "--strengths", "0,1", "--output", str(tmp_path / "grid.png")]
    assert main(sample + flux_args[:2]) == 2  # only --clip-l: the others are named, before anything loads
    said = capsys.readouterr().err
    assert "t5xxl (t5xxl_fp16.safetensors" in said and "vae (ae.safetensors" in said and not (tmp_path / "grid.png").exists()
    assert main(sample + flux_args) == 0
    from PIL import Image

    grid = Image.open(tmp_path / "grid.png")
    assert grid.width >= 2 * 64 and grid.height >= 64  # two strengths of one prompt, labelled


def test_a_flux_run_draws_its_strength_grid_from_the_layers_it_trains(flux_schnell_all_in_one, make_cfg):
    from PIL import Image

    rec = []

    class Samples(Callbacks):
        def on_sample(self, step, path, image=None):
            rec.append((step, path))

    result = train(flux_cfg(make_cfg, flux_schnell_all_in_one, max_train_steps=2, sample_prompts=["a red circle"],
                            sample_strengths=[0.0, 1.0], sample_steps=2), Samples())
    assert [step for step, _ in rec] == [2] and rec[0][1].is_file()
    grid = Image.open(rec[0][1])
    assert grid.width == 2 * 64  # two strengths at the training resolution
    assert result.lora_path.is_file()


def test_the_loss_is_rectified_flow_on_packed_latents_as_flux_pipelines_feed_the_transformer(flux_dev, make_cfg):
    from types import SimpleNamespace

    comps = load_components(flux_dev["base_model"], flux_parts=parts(flux_dev))
    run = SimpleNamespace(components=comps, cfg=make_cfg(guidance_scale=3.5), autocast_dtype=None,
                          device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 16, 8, 8, generator=gen), torch.randn(2, 16, 8, 8, generator=gen)
    t = torch.tensor([0.25, 0.8])
    hidden, pooled = encode_text(comps, ["a red circle", "a blue square"])
    with torch.no_grad():
        ours = objective.flow_losses(run, x0, noise, t, hidden, {"pooled_projections": pooled})
        noisy = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        # the packing itself is checked against FluxPipeline above
        pred = comps.unet(hidden_states=flux.pack_latents(noisy), timestep=t,
                          guidance=torch.full((2,), 3.5), pooled_projections=pooled, encoder_hidden_states=hidden,
                          txt_ids=torch.zeros(hidden.shape[1], 3), img_ids=flux.latent_ids(8, 8, "cpu")).sample
        want = ((flux.unpack_latents(pred, 16, 8, 8) - (noise - x0)) ** 2).mean(dim=(1, 2, 3))
        steps = objective.flow_losses(run, x0, noise, torch.tensor([250, 800]), hidden, {"pooled_projections": pooled})
    torch.testing.assert_close(ours, want)
    torch.testing.assert_close(steps, want)  # validation's integer timesteps are t × 1000


def test_fp8_base_validation_and_clip_l_training_work_for_flux(flux_dev, make_cfg):
    result = train(flux_cfg(make_cfg, flux_dev, max_train_steps=2, save_steps=2, base_precision="fp8",
                            validation_split=0.25, train_text_encoder=True))
    assert [step for step, _ in result.val_losses] == [2]
    tensors = load_file(str(result.lora_path))
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for k in tensors)
    assert not any(k.startswith(("lora_te2", "lora_te3")) for k in tensors)  # T5 is never trained
    with safe_open(str(result.lora_path), "pt") as f:
        meta = f.metadata()
    assert meta["lora_trainer.base_precision"] == "float8_e4m3fn" and "lora_trainer.val_loss" in meta


def test_a_flux_lora_on_an_sd_base_names_both_families(tiny_sd1_file, tmp_path, capsys, make_cfg):
    from safetensors.torch import save_file

    from lora_trainer.adapters.flux_layout import flux_to_kohya

    lora = tmp_path / "flux_style.safetensors"
    save_file(flux_to_kohya({"transformer.transformer_blocks.0.attn.to_q": {"down": torch.randn(2, 32),
                                                                           "up": torch.randn(32, 2)}}), str(lora))
    assert main(["merge", "--base", str(tiny_sd1_file), "--lora", str(lora), "--output", str(tmp_path / "m.safetensors")]) == 2
    assert "flux_style.safetensors is a Flux.1 LoRA and tiny-sd1.safetensors is an SD 1.x checkpoint" in \
        capsys.readouterr().err
    assert main(["sample", "--base-model", str(tiny_sd1_file), "--lora", str(lora), "--prompt", "a", "--steps", "1",
                 "--output", str(tmp_path / "s.png")]) == 2
    assert "This is a Flux.1 LoRA and the base model is an SD 1.x model" in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "s.png").exists()
    from lora_trainer.errors import LoraTrainerError

    with pytest.raises(LoraTrainerError, match="This is a Flux.1 LoRA and the base model is an SD 1.x model"):
        train(make_cfg(base_model=str(tiny_sd1_file), init_lora=str(lora), max_train_steps=1))


def test_resize_and_merge_keep_a_flux_lora_in_its_layout_and_its_update(tmp_path):
    from safetensors.torch import save_file

    from lora_trainer.adapters.flux_layout import flux_to_kohya

    def flux_lora(path, seed):
        gen = torch.Generator().manual_seed(seed)
        tensors = flux_to_kohya({f"transformer.transformer_blocks.0.attn.{m}": {
            "down": torch.randn(2, 32, generator=gen), "up": torch.randn(32, 2, generator=gen)}
            for m in ("to_q", "to_v")})
        save_file(tensors, str(path), {"ss_base_model_version": "flux1", "modelspec.architecture": "flux-1-dev/lora"})
        return tensors

    def update(t, name="lora_unet_double_blocks_0_img_attn_qkv"):
        down, up = t[f"{name}.lora_down.weight"].float(), t[f"{name}.lora_up.weight"].float()
        return up @ down * (float(t[f"{name}.alpha"]) / down.shape[0])

    a, b = flux_lora(tmp_path / "a.safetensors", 1), flux_lora(tmp_path / "b.safetensors", 2)
    assert main(["resize", "--input", str(tmp_path / "a.safetensors"), "--output", str(tmp_path / "r.safetensors"),
                 "--rank", "4"]) == 0
    assert main(["merge", "--lora", str(tmp_path / "a.safetensors"), "--lora", str(tmp_path / "b.safetensors:0.5"),
                 "--output", str(tmp_path / "m.safetensors"), "--precision", "fp32"]) == 0
    resized, merged = load_file(str(tmp_path / "r.safetensors")), load_file(str(tmp_path / "m.safetensors"))
    torch.testing.assert_close(update(resized), update(a), rtol=2e-3, atol=2e-3)  # rank 4 holds the whole update
    torch.testing.assert_close(update(merged), update(a) + 0.5 * update(b), rtol=1e-4, atol=1e-4)
    for path in ("r.safetensors", "m.safetensors"):
        with safe_open(str(tmp_path / path), "pt") as f:
            meta = f.metadata()
        assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["ss_network_module"] == "networks.lora_flux"


def test_the_memory_plan_counts_a_flux_run_from_its_four_files(flux_dev, make_cfg, tmp_path):
    from lora_trainer.training.plan import plan_memory

    def plan(files=flux_dev, **kw):
        return plan_memory(flux_cfg(make_cfg, files, **kw), "cpu").parts

    base = plan()
    # 512 T5 tokens beside 16 image tokens at 64 px, 1024 at 512 px
    assert plan(resolution=512)["activations"] > 1.5 * base["activations"]
    assert plan(lora_rank=16)["LoRA + optimizer"] == 4 * plan(lora_rank=4)["LoRA + optimizer"]
    fp8 = plan(base_precision="fp8")
    assert fp8["base weights (UNet)"] < 0.4 * base["base weights (UNet)"]
    # T5 stays in compute dtype under fp8 (only CLIP-L's layers are stored): the encoders shrink by CLIP's share
    assert 0.5 * base["text encoders + VAE"] < fp8["text encoders + VAE"] < base["text encoders + VAE"]
    deeper = write_tiny_flux(tmp_path / "deeper", "dev", layers=2)  # depth from the file's keys
    assert plan(deeper)["base weights (UNet)"] > 1.3 * base["base weights (UNet)"]
    with pytest.raises(ModelError, match=r"t5xxl \(t5xxl_fp16.safetensors.*is not set"):
        plan(files={**flux_dev, "t5xxl": ""})


def test_a_flux_run_under_a_memory_budget_takes_the_plan_s_changes(flux_dev, make_cfg):
    from lora_trainer.adapters.export import read_lora
    from lora_trainer.training.plan import plan_memory

    cfg = flux_cfg(make_cfg, flux_dev, max_train_steps=1)
    budget = (plan_memory(cfg, "cpu").peak_bytes - 1) / (1 << 30)
    _, meta = read_lora(train(cfg.replace(memory_budget_gb=str(budget))).lora_path)
    assert meta["ss_gradient_checkpointing"] == "True"


def test_a_hosts_all_in_one_state_dict_loads_as_the_file_does_and_is_left_untouched(flux_schnell_all_in_one):
    """What ComfyUI's state_dict_for_saving gives for a Flux MODEL, CLIP and VAE: read without a file; a caller's
    dict keeps its tensors and shares no memory with the training copy, a handed-over one is consumed."""
    from lora_trainer.model.loader import HandedOver

    files = flux_schnell_all_in_one
    tokenizer = {"t5_tokenizer": files["t5_tokenizer"]}
    from_file = load_components(files["base_model"], flux_parts=tokenizer)
    sd = load_file(files["base_model"])
    kept = {k: v.clone() for k, v in sd.items()}
    in_memory = load_components(sd, flux_parts=tokenizer)
    assert set(sd) == set(kept) and all(torch.equal(sd[k], kept[k]) for k in sd)
    pointers = {v.data_ptr() for v in sd.values()}
    for got, want in zip((in_memory.unet, in_memory.vae, *in_memory.text_encoders),
                         (from_file.unet, from_file.vae, *from_file.text_encoders)):
        a, b = got.state_dict(), want.state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
        assert not any(p.data_ptr() in pointers for p in got.parameters())
    assert in_memory.source == "<in-memory>" and in_memory.variant == "schnell"
    handed = HandedOver(load_file(files["base_model"]))
    load_components(handed, flux_parts=tokenizer)
    assert len(handed) == 0


def _updates(comps):
    from lora_trainer.adapters.lora import ADAPTER, lora_layers

    return {name: (layer.lora_B[ADAPTER].weight @ layer.lora_A[ADAPTER].weight * layer.scaling[ADAPTER]).detach()
            for name, layer in lora_layers(comps.unet).items()}


def test_init_lora_continues_from_a_flux_file_in_the_hosts_fused_layout(flux_dev, make_cfg, tmp_path):
    """Ours (block-diagonal ups: each part gets its own rank back) and one as kohya's trainer writes it (one down
    shared by q, k, v: each part takes it whole with its rows of the up) give every split layer its update."""
    from safetensors.torch import save_file

    from lora_trainer.adapters.export import load_lora_file
    from lora_trainer.adapters.lora import ADAPTER, lora_layers

    def fresh():
        return load_components(flux_dev["base_model"], flux_parts=parts(flux_dev))

    trained = fresh()
    ours = train(flux_cfg(make_cfg, flux_dev, max_train_steps=2, learning_rate=1e-2, lora_alpha=8), components=trained)
    again = fresh()
    load_lora_file(again, ours.lora_path)
    want, got = _updates(trained), _updates(again)
    assert set(got) == set(want) and {layer.r[ADAPTER] for layer in lora_layers(again.unet).values()} == {4}
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=2e-3, atol=5e-5, msg=name)

    gen = torch.Generator().manual_seed(1)
    kohya, fused = {}, {}
    for key, tensor in load_file(str(ours.lora_path)).items():
        module, _, part = key.partition(".")
        if part == "lora_down.weight":
            fused.setdefault(module, {})["down"] = torch.randn(3, tensor.shape[1], generator=gen)
        elif part == "lora_up.weight":
            fused.setdefault(module, {})["up"] = torch.randn(tensor.shape[0], 3, generator=gen)
    for module, p in fused.items():
        kohya.update({f"{module}.lora_down.weight": p["down"], f"{module}.lora_up.weight": p["up"],
                      f"{module}.alpha": torch.tensor(1.5)})
    path = tmp_path / "kohya_flux.safetensors"
    save_file(kohya, str(path))
    theirs = fresh()
    load_lora_file(theirs, path)
    got = _updates(theirs)
    width = 32
    qkv = fused["lora_unet_double_blocks_0_img_attn_qkv"]
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        rows = qkv["up"][i * width:(i + 1) * width] @ qkv["down"] * 0.5
        torch.testing.assert_close(got[f"transformer_blocks.0.attn.{name}"], rows, rtol=1e-5, atol=1e-6)
    mlp = fused["lora_unet_single_blocks_0_linear1"]
    torch.testing.assert_close(got["single_transformer_blocks.0.proj_mlp"], mlp["up"][3 * width:] @ mlp["down"] * 0.5,
                               rtol=1e-5, atol=1e-6)
    continued = train(flux_cfg(make_cfg, flux_dev, max_train_steps=1, init_lora=str(path),
                               output_dir=str(tmp_path / "continued")))
    assert continued.lora_path.is_file()


def test_score_ranks_a_flux_lora_s_strengths_on_its_flux_base(flux_schnell_all_in_one, make_cfg, tiny_coca,
                                                               demo_folder, capsys):
    import json

    lora = train(flux_cfg(make_cfg, flux_schnell_all_in_one, max_train_steps=1)).lora_path
    config, weights, _ = tiny_coca
    argv = ["score", "--base-model", flux_schnell_all_in_one["base_model"], "--lora", str(lora), "--prompt",
            "demo_style, a red circle", "--reference-dir", str(demo_folder), "--strengths", "0.5,1",
            "--clip-model", str(config), "--clip-weights", str(weights), "--steps", "2", "--size", "64", "--json",
            "--t5-tokenizer", flux_schnell_all_in_one["t5_tokenizer"]]  # the encoders and VAE: inside the file
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert [s["strength"] for s in result["scores"]] == [0.5, 1.0] and result["best"] in (0.5, 1.0)
    assert all(all(v == v for v in s.values()) for s in result["scores"])  # finite, no NaN


def test_merge_bakes_a_flux_lora_into_the_original_fused_weights_of_the_base(flux_schnell_all_in_one, make_cfg,
                                                                             tmp_path):
    """Bare or all-in-one: the LoRA's fused modules are the file's own weights; CLIP-L's go into the checkpoint's
    text_encoders.clip_l; every other tensor is copied as it is; the file loads again as a Flux base."""
    files = flux_schnell_all_in_one
    lora = train(flux_cfg(make_cfg, files, max_train_steps=2, learning_rate=1e-2, train_text_encoder=True,
                          lora_alpha=8)).lora_path
    out = tmp_path / "merged.safetensors"
    assert main(["merge", "--base", files["base_model"], "--lora", f"{lora}:0.7", "--output", str(out)]) == 0
    base, merged, tensors = load_file(files["base_model"]), load_file(str(out)), load_file(str(lora))
    assert set(merged) == set(base)
    clip, unet = "text_encoders.clip_l.transformer.", "model.diffusion_model."
    weight_of = {("lora_te1_" + k[len(clip):-7] if k.startswith(clip) else "lora_unet_" + k[len(unet):-7])
                 .replace(".", "_"): k for k in base if k.endswith(".weight") and k.startswith((clip, unet))}
    touched = set()
    for key in (k for k in tensors if k.endswith(".lora_down.weight")):
        module = key.split(".")[0]
        down, up = tensors[key].float(), tensors[f"{module}.lora_up.weight"].float()
        scale = float(tensors[f"{module}.alpha"]) / down.shape[0]
        weight = weight_of[module]
        want = base[weight].float() + 0.7 * scale * (up @ down)
        torch.testing.assert_close(merged[weight].float(), want, rtol=1e-5, atol=1e-5, msg=weight)
        touched.add(weight)
    assert any(k.startswith("text_encoders.clip_l.") for k in touched) and len(touched) > 10
    assert all(torch.equal(merged[k], base[k]) for k in base if k not in touched)
    assert load_components(str(out), flux_parts={"t5_tokenizer": files["t5_tokenizer"]}).family == "flux"


def test_a_flux_run_steps_down_after_running_out_of_memory_and_keeps_its_best_checkpoint(flux_dev, make_cfg,
                                                                                          monkeypatch, tmp_path):
    """CUDA's out-of-memory error once, in step 2: the step is redone with gradient checkpointing and the run ends
    with the clean run's LoRA; save_best keeps the lowest validation loss's checkpoint, as for SD."""
    import lora_trainer.training.loop as loop
    from lora_trainer.adapters.export import read_lora

    cfg = flux_cfg(make_cfg, flux_dev, max_train_steps=3, gradient_accumulation_steps=2, validation_split=0.25,
                   save_steps=1, save_best=True)
    clean = train(cfg.replace(output_dir=str(tmp_path / "clean")))
    real, raised = loop._micro_step, []

    def micro_step(run, *args):
        if run.position.step + 1 == 2 and not raised:
            raised.append(2)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(run, *args)

    monkeypatch.setattr(loop, "_micro_step", micro_step)
    backed = train(cfg.replace(output_dir=str(tmp_path / "oom")))
    assert raised and backed.steps == 3
    want, _ = read_lora(clean.lora_path)
    got, meta = read_lora(backed.lora_path)
    assert meta["ss_gradient_checkpointing"] == "True"
    for key in want:
        assert torch.allclose(got[key].float(), want[key].float(), atol=1e-3), key
    best = sorted((tmp_path / "oom").glob("*-best.safetensors"))
    assert len(best) == 1 and read_lora(best[0])[1]["lora_trainer.val_loss"]
