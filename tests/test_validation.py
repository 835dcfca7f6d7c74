"""Validation loss: held-out images are never trained on, values repeat exactly, logs and save_best."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_trainer.callbacks import Callbacks
from lora_trainer.config import TrainConfig
from lora_trainer.errors import ConfigError, DatasetError, ResumeError
from lora_trainer.model import build_tiny_components
from lora_trainer.training.loop import train


class Recorder(Callbacks):
    def __init__(self, stop_at=None):
        self.steps, self.validations, self.saved, self.status = 0, [], [], []
        self.stop_at = stop_at

    def on_loss(self, step, loss, lr):
        self.steps = step

    def on_validation(self, step, val_loss):
        self.validations.append((step, val_loss))

    def on_saved(self, path, final):
        self.saved.append((path, final))

    def on_status(self, message):
        self.status.append(message)

    def should_stop(self):
        return self.stop_at is not None and self.steps >= self.stop_at


def metadata(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_config_checks_the_validation_keys(demo_folder, tmp_path):
    ok = TrainConfig(train_data_dir=str(demo_folder), validation_split=0.5, save_best=True)
    assert ok.validates and not TrainConfig().validates
    with pytest.raises(ConfigError, match="validation_split must be between 0 and 0.5"):
        TrainConfig(validation_split=0.6)
    with pytest.raises(ConfigError, match="validation_split must be between 0 and 0.5"):
        TrainConfig(validation_split=-0.1)
    with pytest.raises(ConfigError, match="both set"):
        TrainConfig(validation_split=0.1, validation_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="validation_dir is train_data_dir"):
        TrainConfig(train_data_dir=str(demo_folder), validation_dir=str(demo_folder) + "/")
    with pytest.raises(ConfigError, match="save_best keeps the checkpoint"):
        TrainConfig(save_best=True)
    with pytest.raises(ConfigError, match="validation_timesteps must be at least 1"):
        TrainConfig(validation_split=0.1, validation_timesteps=0)


def test_split_is_seeded_at_least_one_image_and_leaves_some_to_train(make_cfg, tmp_path):
    from lora_trainer.data.dataset import scan_images
    from lora_trainer.cli.demo_data import make_demo_images
    from lora_trainer.training.validation import split_records

    records, _ = scan_images(make_cfg())
    train_a, held_a = split_records(records, make_cfg(validation_split=0.25))
    train_b, held_b = split_records(records, make_cfg(validation_split=0.25))
    assert [r.name for r in held_a] == [r.name for r in held_b] and len(held_a) == 2 and len(train_a) == 6
    assert not {r.name for r in held_a} & {r.name for r in train_a}
    others = {tuple(r.name for r in split_records(records, make_cfg(validation_split=0.25, seed=s))[1])
              for s in range(6)}
    assert len(others) > 1  # the seed chooses
    assert len(split_records(records, make_cfg(validation_split=0.01))[1]) == 1  # at least one
    one = make_demo_images(tmp_path / "one", n=1)
    single, _ = scan_images(make_cfg(train_data_dir=str(one)))
    with pytest.raises(DatasetError, match="leave none to train on"):
        split_records(single, make_cfg(train_data_dir=str(one), validation_split=0.5))


def test_held_out_images_never_reach_a_training_batch(make_cfg, monkeypatch):
    import lora_trainer.training.batches as batches
    import lora_trainer.training.loop as train_module

    seen = set()
    real_step, real_latent = train_module._micro_step, batches.latent

    def recording_step(run, batch, *args):
        seen.update(record.name for record, _ in batch)
        return real_step(run, batch, *args)

    encoded = []
    monkeypatch.setattr(train_module, "_micro_step", recording_step)
    monkeypatch.setattr(batches, "latent", lambda run, record, *a: encoded.append(record.name)
                        or real_latent(run, record, *a))
    cfg = make_cfg(validation_split=0.25, max_train_steps=3, save_steps=2)  # 3 batches of 2: one epoch
    rec = Recorder()
    result = train(cfg, rec, components=build_tiny_components("sd1"))
    held = set(next(x for x in rec.status if "held out" in x).split("(")[1].rstrip(")").split(", "))
    assert len(held) == 2 and len(seen) == 6 and not held & seen  # every training image seen, no held-out one
    assert held <= set(encoded)  # encoded for validation (centre crop) only
    assert [s for s, _ in result.val_losses] == [2, 3] == [s for s, _ in rec.validations]
    meta = metadata(result.lora_path)
    assert json.loads(meta["ss_dataset_dirs"])["data"]["img_count"] == 6
    assert float(meta["lora_trainer.val_loss"]) == result.val_losses[-1][1]


def test_values_repeat_exactly_across_runs_and_after_a_resume(make_cfg, tmp_path):
    settings = dict(validation_split=0.25, max_train_steps=6, save_steps=2, lora_dropout=0.3, noise_offset=0.05,
                    min_snr_gamma=5, caption_dropout_rate=0.2, shuffle_caption=True)
    first = train(make_cfg(**settings), Recorder(), components=build_tiny_components("sd1"))
    again = train(make_cfg(**settings, output_dir=str(tmp_path / "again")), Recorder(),
                  components=build_tiny_components("sd1"))
    assert [s for s, _ in first.val_losses] == [2, 4, 6]
    assert first.val_losses == again.val_losses  # exactly: fixed noise, fixed timesteps, eval mode
    assert len({v for _, v in first.val_losses}) == 3  # and they do move as the LoRA trains

    cfg = make_cfg(**settings, output_dir=str(tmp_path / "resumed"))
    stopped = train(cfg, Recorder(stop_at=3), components=build_tiny_components("sd1"))
    assert stopped.stopped and stopped.val_losses == first.val_losses[:1]
    with pytest.raises(ResumeError, match=r"validation_split \(0.25 → 0.5\)"):
        train(cfg.replace(validation_split=0.5), Recorder(), components=build_tiny_components("sd1"),
              resume=cfg.output_dir)
    resumed = train(cfg, Recorder(), components=build_tiny_components("sd1"), resume=cfg.output_dir)
    assert resumed.val_losses == first.val_losses[1:]


def test_val_loss_goes_to_train_jsonl_and_tensorboard(make_cfg):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_cfg(validation_split=0.25, max_train_steps=4, save_steps=2)
    result = train(cfg, Recorder(), components=build_tiny_components("sd1"))
    logs = Path(cfg.output_dir) / "logs"
    lines = [json.loads(x) for x in (logs / "train.jsonl").read_text().splitlines()]
    assert [(x["step"], x["val_loss"]) for x in lines if x["event"] == "validation"] == result.val_losses
    acc = EventAccumulator(str(logs))
    acc.Reload()
    events = acc.Scalars("val_loss")
    assert [e.step for e in events] == [2, 4]
    assert [e.value for e in events] == pytest.approx([v for _, v in result.val_losses], rel=1e-6)  # float32


def test_save_best_keeps_the_lowest_and_never_overwrites_a_finished_file(make_cfg):
    cfg = make_cfg(validation_split=0.25, max_train_steps=6, save_steps=2, save_best=True, learning_rate=1e-2)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True)
    (out / "lora-best.safetensors").write_bytes(b"a finished LoRA of another run")
    rec = Recorder()
    result = train(cfg, rec, components=build_tiny_components("sd1"))
    assert (out / "lora-best.safetensors").read_bytes() == b"a finished LoRA of another run"
    best = out / "lora-best-v2.safetensors"
    step, lowest = min(result.val_losses, key=lambda sv: sv[1])
    meta = metadata(best)
    assert float(meta["lora_trainer.val_loss"]) == lowest and meta["ss_steps"] == str(step)
    assert sorted(p.name for p in out.glob("lora-best*")) == ["lora-best-v2.safetensors", "lora-best.safetensors"]
    assert (best, False) in rec.saved
    state = json.loads(next(iter(sorted((out / "state").glob("step-*"))[-1:])).joinpath("state.json").read_text())
    assert state["validation"]["best"] == {"val_loss": lowest, "step": step, "path": str(best)}


def test_validation_dir_leaves_the_trained_lora_unchanged(make_cfg, tmp_path):
    from lora_trainer.cli.demo_data import make_demo_images

    val_dir = make_demo_images(tmp_path / "val", n=3, size=80)
    plain = train(make_cfg(max_train_steps=4, save_precision="fp32"), Recorder(),
                  components=build_tiny_components("sd1"))
    rec = Recorder()
    validated = train(make_cfg(max_train_steps=4, save_precision="fp32", validation_dir=str(val_dir),
                               output_dir=str(tmp_path / "validated")), rec, components=build_tiny_components("sd1"))
    assert [s for s, _ in validated.val_losses] == [4] and plain.val_losses == []
    a, b = load_file(str(plain.lora_path)), load_file(str(validated.lora_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("validation: 3 image(s) × 4 timesteps" in s for s in rec.status)
    assert "lora_trainer.val_loss" not in metadata(plain.lora_path)


def test_a_pass_is_in_eval_mode_and_gives_training_mode_back(make_cfg):
    from lora_trainer.training.setup import prepare_run
    from lora_trainer.training.validation import Validator, fixed_timesteps

    assert fixed_timesteps(1000, 4) == [125, 375, 625, 875] and fixed_timesteps(1000, 1) == [500]
    run = prepare_run(make_cfg(validation_split=0.25, lora_dropout=0.5), Callbacks(),
                      components=build_tiny_components("sd1"))
    run.components.unet.train(True)
    validator = Validator(run)
    validator.prepare(Callbacks())
    modes = []
    real = run.components.unet.forward
    run.components.unet.forward = lambda *a, **k: modes.append(run.components.unet.training) or real(*a, **k)
    first, second = validator.measure(), validator.measure()
    assert first == second and set(modes) == {False} and len(modes) == 2 * 2 * 2  # images × chunks of batch 2
    assert run.components.unet.training


def test_loss_image_draws_validation_points():
    from lora_trainer.evaluate.loss_plot import loss_image

    plain = loss_image([1.0, 0.8, 0.7, 0.65], 320, 160)
    with_val = loss_image([1.0, 0.8, 0.7, 0.65], 320, 160, val=[(2, 0.9), (4, 0.75)])
    assert plain.size == with_val.size == (320, 160) and plain.tobytes() != with_val.tobytes()
    assert loss_image([], 320, 160, val=[(2, 0.9)]).size == (320, 160)


def test_validation_dir_is_read_like_train_data_dir_and_capped(make_cfg, tmp_path):
    from lora_trainer.config import MAX_VALIDATION_IMAGES
    from lora_trainer.data.dataset import scan_images
    from lora_trainer.cli.demo_data import make_demo_images
    from lora_trainer.training.validation import validation_records

    many = make_demo_images(tmp_path / "many", n=MAX_VALIDATION_IMAGES + 2)  # its first 8 = demo_folder's
    cfg = make_cfg(validation_dir=str(many), trigger_word="demo_style")
    records, _ = scan_images(cfg)
    rec = Recorder()
    train_records, held = validation_records(cfg, records, rec)
    assert train_records == records and len(held) == MAX_VALIDATION_IMAGES
    assert [r.name for r in held] == [r.name for r in validation_records(cfg, records, Recorder())[1]]
    assert held[0].caption.startswith("demo_style, ") and "flat style" in held[0].caption  # metadata.csv + trigger
    assert any(f"using {MAX_VALIDATION_IMAGES} of the {MAX_VALIDATION_IMAGES + 2} images" in s for s in rec.status)
    assert any("also trained on (same file)" in s for s in rec.status)  # the demo images repeat across folders
    with pytest.raises(DatasetError, match="validation_dir not found"):
        validation_records(make_cfg(validation_dir=str(tmp_path / "nope")), records, rec)
