"""The training loop on tiny random models: it learns, touches only LoRA weights, saves, stops."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lora_trainer.callbacks import Callbacks
from lora_trainer.model import build_tiny_components, encode_text, unet_added_cond
from lora_trainer.training.checkpoints import latest_run_dir
from lora_trainer.training.loop import train


class Recorder(Callbacks):
    def __init__(self, stop_at=None):
        self.losses, self.saved, self.samples, self.status = [], [], [], []
        self.progress = []
        self.stop_at = stop_at

    def on_loss(self, step, loss, lr):
        self.losses.append(loss)

    def on_progress(self, step, total):
        self.progress.append((step, total))

    def on_saved(self, path, final):
        self.saved.append((path, final))

    def on_sample(self, step, path, image=None):
        self.samples.append(path)

    def on_status(self, message):
        self.status.append(message)

    def should_stop(self):
        return self.stop_at is not None and len(self.losses) >= self.stop_at


def fixed_loss(components, images, captions, sizes):
    """Denoising loss at fixed noise and timesteps: comparable before and after training."""
    from lora_trainer.data.latents import encode_pixels

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents = encode_pixels(components.vae, images)
        hidden, pooled = encode_text(components, captions)
        n = latents.shape[0]
        added = unet_added_cond(components, pooled, *sizes)
        total = 0.0
        for t in (100, 400, 700):
            noise = torch.randn(latents.shape, generator=g)
            ts = torch.full((n,), t)
            noisy = components.noise_scheduler.add_noise(latents, noise, ts)
            pred = components.unet(noisy, ts, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
            total += torch.nn.functional.mse_loss(pred, noise).item()
    return total / 3


def demo_pixels(cfg):
    from lora_trainer.data.dataset import prepare_image, scan_images

    records, _ = scan_images(cfg)
    prepared = [prepare_image(r, (64, 64)) for r in records[:2]]
    sizes = ([p.original_size for p in prepared], [p.crop_top_left for p in prepared],
             [p.target_size for p in prepared])
    return torch.stack([p.pixels for p in prepared]), [r.caption for r in records[:2]], sizes


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_overfitting_lowers_the_loss_and_only_lora_weights_change(family, make_cfg, tmp_path):
    from lora_trainer.cli.demo_data import make_demo_images

    two_images = make_demo_images(tmp_path / "two", n=2)
    cfg = make_cfg(train_data_dir=str(two_images), max_train_steps=40, learning_rate=1e-2, batch_size=2,
                   target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "ff"])
    components = build_tiny_components(family, seed=1)
    before = {k: v.clone() for k, v in components.unet.state_dict().items()}
    images, captions, sizes = demo_pixels(cfg)
    loss_before = fixed_loss(components, images, captions, sizes)

    rec = Recorder()
    result = train(cfg, rec, components=components)

    assert result.lora_path.is_file() and not result.stopped and result.steps == 40
    assert len(rec.losses) == 40 and rec.progress[-1] == (40, 40)
    assert fixed_loss(components, images, captions, sizes) < 0.95 * loss_before  # fixed noise: no luck involved
    after = components.unet.state_dict()
    for key, value in before.items():
        base_key = key  # peft renames wrapped weights to `<layer>.base_layer.weight`
        if base_key not in after:
            base_key = key.rsplit(".", 1)[0] + ".base_layer." + key.rsplit(".", 1)[1]
        assert torch.equal(after[base_key], value), f"base weight changed: {key}"
    assert any("lora_B" in k and after[k].abs().sum() > 0 for k in after)


def test_should_stop_saves_a_resumable_state(make_cfg):
    cfg = make_cfg(max_train_steps=10)
    rec = Recorder(stop_at=3)
    result = train(cfg, rec, components=build_tiny_components("sd1"))
    assert result.stopped and result.steps == 3 and result.lora_path is None
    assert (result.state_dir / "state.json").is_file()
    assert json.loads((result.state_dir / "state.json").read_text())["step"] == 3


@pytest.mark.once  # the same on every stack: the newest runs it
def test_checkpoints_keep_last_n_and_a_second_run_keeps_every_file_of_the_first(make_cfg):
    cfg = make_cfg(max_train_steps=6, save_steps=2, save_last_n=2, sample_prompts=["demo_style, a square"],
                   sample_strengths=[0.0, 1.0], sample_steps=2)
    out = Path(cfg.output_dir)
    first = train(cfg, Recorder(), components=build_tiny_components("sd1"))
    steps = sorted(p.name for p in out.glob("*-step*.safetensors"))
    assert steps == ["lora-step00000004.safetensors", "lora-step00000006.safetensors"]
    assert len(list((out / "state").glob("step-*"))) == 2
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert first.output_dir == out and any(p.parent.name == "samples" for p in before)
    rec = Recorder()
    second = train(cfg.replace(max_train_steps=2), rec, components=build_tiny_components("sd1"))
    assert second.output_dir == out.with_name(out.name + "-v2")
    assert second.lora_path == second.output_dir / "lora.safetensors"
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before  # not one file touched
    assert any(f"this run writes into {second.output_dir}" in s and "--resume" in s for s in rec.status)
    third = train(cfg.replace(max_train_steps=2), Recorder(), components=build_tiny_components("sd1"))
    assert third.output_dir.name == out.name + "-v3" and latest_run_dir(str(out)) == str(third.output_dir)


def test_every_run_writes_real_tensorboard_events_and_json_lines(make_cfg):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_cfg(max_train_steps=4, sample_prompts=["demo_style, a square"], sample_strengths=[0.0, 1.0],
                   sample_steps=2)
    rec = Recorder()
    train(cfg, rec, components=build_tiny_components("sd1"))  # no logger passed: train() writes logs/ itself
    acc = EventAccumulator(str(rec.saved[-1][0].parent / "logs"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]
    assert "lr" in acc.Tags()["scalars"] and "samples" in acc.Tags()["images"]
    lines = [json.loads(x) for x in (rec.saved[-1][0].parent / "logs" / "train.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["event"] == "loss"] == [1, 2, 3, 4]
    assert rec.samples and rec.samples[0].is_file()


def test_saved_file_is_kohya_layout_with_metadata(make_cfg):
    cfg = make_cfg(max_train_steps=2, trigger_word="demo_style", lora_rank=4, lora_alpha=8)
    result = train(cfg, Recorder(), components=build_tiny_components("sd1"))
    with safe_open(str(result.lora_path), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
        assert f.get_tensor(keys[0]).dtype == torch.float16
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_output_name"] == "lora" and meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.trigger_phrase"] == "demo_style"
    assert json.loads(meta["lora_trainer.config"])["lora_rank"] == 4
    assert json.loads(meta["ss_tag_frequency"])["data"]
    assert meta["ss_steps"] == "2" and len(meta["sshs_model_hash"]) == 64
    assert all(k.startswith("lora_unet_") for k in keys)


def test_host_interface_gets_the_lora_and_its_gpu_back(make_cfg, tmp_path):
    from lora_trainer.callbacks import HostInterface

    calls = []

    class Host(HostInterface):
        def lora_dir(self):
            return tmp_path / "host_loras"

        def free_gpu(self):
            calls.append("free")

        def restore_gpu(self):
            calls.append("restore")

        def refresh_loras(self):
            calls.append(("refresh", sorted(p.name for p in (tmp_path / "host_loras").iterdir())))

    result = train(make_cfg(max_train_steps=2), host=Host(), components=build_tiny_components("sd1"))
    assert result.lora_path == tmp_path / "host_loras" / "lora.safetensors"
    assert calls == ["free", ("refresh", ["lora.safetensors"]), "restore"]


def test_host_keeps_its_gpu_on_bad_input_and_gets_it_back_on_failure(make_cfg, tmp_path):
    from lora_trainer.callbacks import HostInterface
    from lora_trainer.errors import DatasetError, ModelError

    calls = []

    class Host(HostInterface):
        def free_gpu(self):
            calls.append("free")

        def restore_gpu(self):
            calls.append("restore")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="No images in"):
        train(make_cfg(train_data_dir=str(empty)), host=Host(), components=build_tiny_components("sd1"))
    assert calls == []
    with pytest.raises(ModelError, match="not found"):
        train(make_cfg(base_model=str(tmp_path / "missing.safetensors")), host=Host())
    assert calls == ["free", "restore"]


def test_nan_loss_stops_with_advice_before_touching_the_weights(make_cfg, monkeypatch):
    import lora_trainer.training.loop as train_module
    from lora_trainer.errors import TrainingError

    components = build_tiny_components("sd1")
    real = train_module._micro_step
    calls = []

    def poisoned(run, *args):
        calls.append(1)
        loss = real(run, *args)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(train_module, "_micro_step", poisoned)
    with pytest.raises(TrainingError, match="loss became nan at step 3. Lower learning_rate"):
        train(make_cfg(max_train_steps=5, batch_size=1), components=components)
    from lora_trainer.adapters.lora import lora_parameters

    assert all(torch.isfinite(p).all() for p in lora_parameters(components.unet))


def test_sd2_v_prediction_trains_against_velocity_and_is_labelled_v2(make_cfg, monkeypatch):
    from diffusers import DDPMScheduler

    components = build_tiny_components("sd2")
    components.prediction_type = "v_prediction"
    components.noise_scheduler = DDPMScheduler.from_config(components.noise_scheduler.config,
                                                           prediction_type="v_prediction")
    velocity_calls = []
    real = components.noise_scheduler.get_velocity
    monkeypatch.setattr(components.noise_scheduler, "get_velocity",
                        lambda *a: velocity_calls.append(1) or real(*a))
    result = train(make_cfg(max_train_steps=2, batch_size=1), components=components)
    assert len(velocity_calls) == 2
    with safe_open(str(result.lora_path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_v2"] == "True" and meta["ss_base_model_version"] == "sd_v2_v"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
