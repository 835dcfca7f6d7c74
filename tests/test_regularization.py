"""Regularization (class) images: reg_data_dir mixed into each epoch as kohya's scripts mix them, their loss
weighted by prior_loss_weight, reg_generate's images made once, the doctor reading the folder too."""

from collections import Counter

import pytest
from PIL import Image
from safetensors import safe_open

from lora_trainer.callbacks import Callbacks
from lora_trainer.cli.demo_data import make_demo_images
from lora_trainer.config import TrainConfig
from lora_trainer.data.dataset import batches_per_epoch, epoch_batches, missing_class_images
from lora_trainer.data.doctor import examine
from lora_trainer.errors import ConfigError, DatasetError
from lora_trainer.model import build_tiny_components
from lora_trainer.training.loop import train
from lora_trainer.training.setup import check_inputs


@pytest.fixture
def reg_folder(tmp_path):
    """Three class images with captions (a metadata.csv) and one without."""
    folder = make_demo_images(tmp_path / "reg", n=3, size=80)  # other pixels than the 96 px training images
    Image.new("RGB", (80, 80), (90, 30, 200)).save(folder / "uncaptioned.png")
    return folder


def test_each_epoch_trains_as_many_class_images_as_training_images_cycled_in_name_order(make_cfg, reg_folder):
    cfg = make_cfg(reg_data_dir=str(reg_folder), class_prompt="a shape", trigger_word="sks", repeats=2,
                   batch_size=1)
    records = check_inputs(cfg, Callbacks()).records
    train_set = [r for r in records if not r.is_reg]
    reg = sorted((r for r in records if r.is_reg), key=lambda r: r.name)
    assert len(train_set) == 8 and [r.name for r in reg] == ["reg/img001.png", "reg/img002.png", "reg/img003.png",
                                                             "reg/uncaptioned.png"]
    # class images keep their own captions, never the trigger word; class_prompt where they have none
    assert all("sks" not in r.caption for r in reg) and all(r.caption.startswith("sks") for r in train_set)
    assert reg[-1].caption == "a shape" and reg[0].caption.endswith("flat style")

    batches = epoch_batches(records, cfg, 0, cfg.seed)
    seen = Counter(r.name for batch in batches for r, _ in batch)
    assert sum(seen[r.name] for r in train_set) == 16  # 8 images x 2 repeats
    assert [seen[r.name] for r in reg] == [4, 4, 4, 4]  # as many class images: 16 over 4, cycled
    assert batches_per_epoch(records, cfg) == len(batches) == 32

    fewer = make_cfg(reg_data_dir=str(reg_folder), repeats=1, batch_size=1)
    seen = Counter(r.name for batch in epoch_batches(records, fewer, 0, 0) for r, _ in batch)
    assert [seen[r.name] for r in reg] == [2, 2, 2, 2]  # 8 = 2 x 4
    without = make_cfg(repeats=2, batch_size=1)  # no reg_data_dir: the epoch is the training images alone
    assert len(epoch_batches(train_set, without, 0, 0)) == 16


def _micro_loss(make_cfg, reg_folder, weight):
    from lora_trainer.training.loop import _micro_step
    from lora_trainer.training.setup import prepare_run

    cfg = make_cfg(reg_data_dir=str(reg_folder), prior_loss_weight=weight, cache_latents=False)
    run = prepare_run(cfg, Callbacks(), components=build_tiny_components("sd1", seed=3))
    train_image = next(r for r in run.records if not r.is_reg)
    class_image = next(r for r in run.records if r.is_reg)
    return _micro_step(run, [(train_image, (64, 64)), (class_image, (64, 64))], 0, 0).item()


def test_the_class_images_loss_is_weighted_by_prior_loss_weight(make_cfg, reg_folder):
    none, half, whole = (_micro_loss(make_cfg, reg_folder, w) for w in (0.0, 0.5, 1.0))
    assert none > 0 and whole > none
    # the batch's mean of (train loss + w x class loss): linear in w, and the train image's part unchanged
    assert whole - none == pytest.approx(2 * (half - none), rel=1e-4)


def test_a_missing_or_empty_reg_folder_and_reg_generate_without_prompt_are_one_line(make_cfg, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="reg_data_dir .*empty holds no images: put class images in it, or set "
                                           "reg_generate"):
        check_inputs(make_cfg(reg_data_dir=str(tmp_path / "empty")), Callbacks())
    with pytest.raises(DatasetError, match="reg_data_dir not found: .*nowhere"):
        check_inputs(make_cfg(reg_data_dir=str(tmp_path / "nowhere")), Callbacks())
    with pytest.raises(ConfigError, match="reg_generate makes class images from class_prompt into reg_data_dir"):
        TrainConfig(reg_generate=4, reg_data_dir=str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="prior_loss_weight cannot be negative"):
        TrainConfig(prior_loss_weight=-1)
    with pytest.raises(ConfigError, match="reg_data_dir is train_data_dir"):
        make_cfg(reg_data_dir=make_cfg().train_data_dir)


def test_reg_generate_makes_the_missing_class_images_once_and_the_lora_records_them(make_cfg, tmp_path):
    reg = tmp_path / "class"
    cfg = make_cfg(reg_data_dir=str(reg), reg_generate=2, class_prompt="a flat shape", max_train_steps=2)
    assert missing_class_images(cfg) == 2
    status = []

    class Status(Callbacks):
        def on_status(self, message):
            status.append(message)

    result = train(cfg, Status(), components=build_tiny_components("sd1", seed=1))
    made = sorted(p.name for p in reg.iterdir())
    assert made == ["class_0000.png", "class_0000.txt", "class_0001.png", "class_0001.txt"]
    assert (reg / "class_0001.txt").read_text() == "a flat shape"
    assert Image.open(reg / "class_0000.png").size == (64, 64)  # the training resolution
    assert any("making class images 2/2" in s for s in status)
    with safe_open(str(result.lora_path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_num_reg_images"] == "2" and meta["ss_num_train_images"] == "8"

    status.clear()
    again = train(cfg.replace(output_dir=str(tmp_path / "again")), Status(), components=build_tiny_components("sd1"))
    assert missing_class_images(cfg) == 0 and not any("making class images" in s for s in status)
    assert sorted(p.name for p in reg.iterdir()) == made and again.lora_path.is_file()


def test_the_doctor_checks_the_reg_folder_and_counts_its_steps(make_cfg, reg_folder, tmp_path):
    (reg_folder / "broken.jpg").write_bytes(b"not a jpeg" * 20)
    alone = examine(cfg=make_cfg(batch_size=1))
    report = examine(cfg=make_cfg(reg_data_dir=str(reg_folder), class_prompt="a shape", batch_size=1))
    found = {(f.file, f.problem) for f in report.findings}
    assert ("reg/broken.jpg", "unreadable") in found
    assert ("reg/uncaptioned.png", "no_caption") not in found  # class_prompt is its caption
    assert report.steps["per_epoch"] == 2 * alone.steps["per_epoch"]

    (tmp_path / "empty").mkdir()
    empty = examine(cfg=make_cfg(reg_data_dir=str(tmp_path / "empty")))
    assert [(f.file, f.problem, f.severity) for f in empty.errors] == [("reg/", "no_images", "error")]
    planned = examine(cfg=make_cfg(reg_data_dir=str(tmp_path / "empty"), reg_generate=3, class_prompt="a shape"))
    assert planned.ok and any("reg_generate makes 3" in f.detail for f in planned.findings)
