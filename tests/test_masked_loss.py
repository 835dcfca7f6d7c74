"""masked_loss: masks found beside the image, in mask_dir or in its alpha, moved with every crop and flip, the
loss weighted by them at latent size (zero gradient where black), the doctor's findings on bad masks."""

import random

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from lora_trainer.callbacks import Callbacks
from lora_trainer.config import TrainConfig
from lora_trainer.data.dataset import plan_crop, prepare_image, prepare_mask, scan_images
from lora_trainer.data.doctor import examine
from lora_trainer.data.images import list_images
from lora_trainer.data.masks import find_mask, latent_mask
from lora_trainer.errors import ConfigError
from lora_trainer.model import build_tiny_components
from lora_trainer.training.loop import train


def _half_mask(size, left=True):
    """White on the left (or right) half."""
    w, h = size
    arr = np.zeros((h, w), np.uint8)
    if left:
        arr[:, : w // 2] = 255
    else:
        arr[:, w // 2:] = 255
    return Image.fromarray(arr, "L")


def _masked_folder(folder, size=96):
    """Demo images, each with a <name>_mask.png white on its left half."""
    from lora_trainer.cli.demo_data import make_demo_images

    make_demo_images(folder, n=4, size=size)
    for image in list_images(folder):
        _half_mask(Image.open(image).size).save(image.with_name(f"{image.stem}_mask.png"))
    return folder


def test_masks_are_found_beside_in_mask_dir_or_in_alpha_and_are_not_images_of_their_own(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "a.jpg")
    _half_mask((64, 64)).save(tmp_path / "a_mask.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "b.png")
    Image.new("RGBA", (64, 64), (1, 2, 3, 0)).save(tmp_path / "c.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "lonely_mask.png")  # no "lonely" image: an image of its own
    masks = tmp_path / "masks"
    masks.mkdir()
    _half_mask((64, 64)).save(masks / "b.png")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.png", "c.png", "lonely_mask.png"]
    assert find_mask(tmp_path / "a.jpg") == tmp_path / "a_mask.png"
    assert find_mask(tmp_path / "b.png") is None and find_mask(tmp_path / "b.png", str(masks)) == masks / "b.png"
    assert find_mask(tmp_path / "c.png") == tmp_path / "c.png"  # its alpha channel

    records, report = scan_images(TrainConfig(train_data_dir=str(tmp_path), masked_loss=True, mask_dir=str(masks),
                                              min_bucket_reso=64))
    by_name = {r.name: r for r in records}
    assert by_name["a.jpg"].mask == tmp_path / "a_mask.png" and by_name["c.png"].mask == tmp_path / "c.png"
    alpha = prepare_mask(by_name["c.png"], (64, 64), plan_crop(by_name["c.png"], (64, 64)))
    assert float(alpha.max()) == 0.0  # alpha 0 everywhere: nothing to learn from
    assert any("lonely_mask.png has no mask" in w for w in report.warnings)
    with pytest.raises(ConfigError, match="mask_dir is set but masked_loss is off"):
        TrainConfig(mask_dir=str(masks))


@pytest.mark.parametrize("flip", [False, True])
def test_the_mask_moves_with_the_image_through_resize_crop_and_flip(tmp_path, flip):
    # An image that is bright exactly where its mask is white, wider than its bucket: cropped at random places.
    arr = np.zeros((64, 160, 3), np.uint8)
    arr[:, :50] = 255
    Image.fromarray(arr).save(tmp_path / "wide.png")
    mask = np.zeros((64, 160), np.uint8)
    mask[:, :50] = 255
    Image.fromarray(mask).save(tmp_path / "wide_mask.png")
    cfg = TrainConfig(train_data_dir=str(tmp_path), masked_loss=True, min_bucket_reso=64)
    record = scan_images(cfg)[0][0]
    for seed in range(4):
        crop = plan_crop(record, (64, 64), flip, random.Random(seed))
        pixels = prepare_image(record, (64, 64), crop=crop).pixels
        masked = prepare_mask(record, (64, 64), crop)
        assert masked.shape == (1, 64, 64)
        bright, white = pixels.mean(0) > 0, masked[0] > 0.5
        assert (bright == white).float().mean() > 0.97  # the same pixels, up to the resampling at the edge
    unflipped = prepare_mask(record, (64, 64), plan_crop(record, (64, 64), False))
    flipped = prepare_mask(record, (64, 64), plan_crop(record, (64, 64), True))
    assert torch.equal(flipped, unflipped.flip(-1))


def test_latent_mask_is_each_latent_positions_share_of_white():
    mask = torch.zeros((1, 64, 64))
    mask[:, :, :32] = 1.0
    mask[:, :, 32:36] = 0.5
    small = latent_mask(mask, (8, 8))
    assert small.shape == (1, 8, 8)
    assert torch.equal(small[0, :, :4], torch.ones(8, 4)) and torch.allclose(small[0, :, 4], torch.full((8,), 0.25))
    assert float(small[0, :, 5:].abs().max()) == 0.0


def _prediction_grads(make_cfg, folder, mask_value):
    """The gradient of one micro-step's loss on the UNet's prediction, and on the LoRA weights."""
    from lora_trainer.training.loop import _micro_step
    from lora_trainer.training.setup import prepare_run

    for m in folder.glob("*_mask.png"):
        _half_mask(Image.open(m).size).point(lambda v: v * mask_value).save(m)
    run = prepare_run(make_cfg(train_data_dir=str(folder), masked_loss=True, cache_latents=False, batch_size=1),
                      Callbacks(), components=build_tiny_components("sd1", seed=2))
    for p in run.params:
        torch.nn.init.normal_(p, std=0.02)  # up matrices start at zero: give every LoRA weight a gradient path
    seen = {}

    def keep(module, args, output):
        output.sample.retain_grad()
        seen["pred"] = output.sample

    handle = run.components.unet.register_forward_hook(keep)
    try:
        _micro_step(run, [(run.records[0], (64, 64))], 0, 0).backward()
    finally:
        handle.remove()
    return seen["pred"].grad, [p.grad for p in run.params]


def test_black_mask_positions_get_no_gradient_and_an_all_black_mask_none_at_all(make_cfg, tmp_path):
    # 64 px images (no resizing: the mask's edge falls between latent columns), 8 latent columns: white on 4
    grad, lora_grads = _prediction_grads(make_cfg, _masked_folder(tmp_path / "half", size=64), 1)
    assert grad.shape[-1] == 8
    assert float(grad[..., 4:].abs().max()) == 0.0 and float(grad[..., :4].abs().min()) > 0
    assert any(float(g.abs().max()) > 0 for g in lora_grads)
    _, lora_grads = _prediction_grads(make_cfg, _masked_folder(tmp_path / "black", size=64), 0)
    assert all(g is None or float(g.abs().max()) == 0.0 for g in lora_grads)


def test_a_masked_run_trains_and_says_so_in_the_metadata(make_cfg, tmp_path):
    folder = _masked_folder(tmp_path / "masked")
    result = train(make_cfg(train_data_dir=str(folder), masked_loss=True, flip_aug=True, max_train_steps=3),
                   components=build_tiny_components("sd1"))
    assert len(result.losses) == 3 and all(np.isfinite(result.losses))
    with safe_open(str(result.lora_path), "pt") as f:
        assert f.metadata()["ss_masked_loss"] == "True"


def test_the_doctor_flags_unreadable_resized_and_missing_masks_and_training_skips_the_unreadable(make_cfg, tmp_path):
    folder = _masked_folder(tmp_path / "masked")
    (folder / "img001_mask.png").write_bytes(b"not a png at all" * 8)
    _half_mask((50, 40)).save(folder / "img002_mask.png")
    (folder / "img003_mask.png").unlink()
    cfg = make_cfg(train_data_dir=str(folder), masked_loss=True)
    report = examine(cfg=cfg)
    found = {f.file: (f.problem, f.severity) for f in report.findings if f.problem.startswith(("mask", "no_mask"))}
    assert found == {"img001.png": ("mask_unreadable", "error"), "img002.png": ("mask_size", "warning"),
                     "img003.png": ("no_mask", "warning")}
    records, scan = scan_images(cfg)
    assert [r.name for r in records] == ["img002.png", "img003.png", "img004.png"]
    assert "img001.png" in dict(scan.skipped) and "its mask cannot be used" in dict(scan.skipped)["img001.png"]
    assert ("img002.png", "mask 50x40 resized to the image's 96x96") in scan.fixed
