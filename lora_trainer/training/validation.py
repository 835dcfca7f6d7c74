"""Validation loss: held-out images scored at fixed noise, so values compare between saves and runs.

The images are a `validation_split` share of train_data_dir (chosen by the seed; the training
batches never see them) or the images of `validation_dir`, at most `MAX_VALIDATION_IMAGES`.
Each one is centre-cropped to its bucket without flipping, keeps its caption as training reads it
(trigger word applied, no dropout or shuffling) and is scored at `validation_timesteps` evenly
spaced timesteps, with noise drawn on the CPU from a generator seeded by the seed and the image's
name. So the same LoRA weights give the same value in every pass and every run, on CPU or GPU.

The loss is training's own (`objective.image_losses`: prediction type, min-SNR weighting, noise
offset), averaged over images × timesteps, with the model in eval mode (no LoRA dropout) and no
gradients. Nothing here draws from the training RNGs, so validating with validation_dir trains
exactly the LoRA an unvalidated run trains.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Tuple

from ..config import MAX_VALIDATION_IMAGES
from ..data.dataset import ImageRecord, assign_bucket, make_buckets, plan_crop, scan_images
from ..errors import DatasetError
from . import batches, objective
from .state import dataset_hash

if TYPE_CHECKING:
    from ..callbacks import Callbacks
    from ..config import TrainConfig


# -- which images ------------------------------------------------------------------------------

def validation_records(cfg: TrainConfig, records: List[ImageRecord], callbacks: Callbacks,
                       ) -> Tuple[List[ImageRecord], List[ImageRecord]]:
    """(images to train on, images to validate on): the split of `records`, or validation_dir's images."""
    if cfg.validation_split:
        train, held = split_records(records, cfg)
        callbacks.on_status(f"validation: {len(held)} of {len(records)} images held out "
                            f"({', '.join(r.name for r in held[:5])}{' ...' if len(held) > 5 else ''})")
    elif cfg.validation_dir:
        train, held = records, _folder_records(cfg, callbacks)
    else:
        return records, []
    _warn_duplicates(train, held, callbacks)
    return train, held


def split_records(records: List[ImageRecord], cfg: TrainConfig) -> Tuple[List[ImageRecord], List[ImageRecord]]:
    """Hold out round(n × validation_split) images (at least 1, at most MAX_VALIDATION_IMAGES), chosen by the seed."""
    count = min(MAX_VALIDATION_IMAGES, max(1, int(len(records) * cfg.validation_split + 0.5)))
    if count >= len(records):
        raise DatasetError(f"validation_split {cfg.validation_split} would hold out all {len(records)} image(s) and "
                           "leave none to train on. Add images, or use validation_dir with images of its own.")
    held = set(_seeded_pick(sorted(r.name for r in records), count, cfg.seed))
    return [r for r in records if r.name not in held], sorted((r for r in records if r.name in held),
                                                               key=lambda r: r.name)


def _folder_records(cfg: TrainConfig, callbacks: Callbacks) -> List[ImageRecord]:
    folder = Path(cfg.validation_dir)
    if not folder.is_dir():
        raise DatasetError(f"validation_dir not found: {cfg.validation_dir}. Point it at a folder of validation "
                           "images (with their captions), or leave it empty.")
    # Read like train_data_dir: its own metadata.csv / metadata.jsonl, then .txt sidecars.
    records, report = scan_images(cfg.replace(train_data_dir=str(folder), metadata_path="", validation_dir="",
                                              save_best=False))
    callbacks.on_status(f"validation images in {folder.name}: {report.summary()}")
    if len(records) > MAX_VALIDATION_IMAGES:
        picked = set(_seeded_pick(sorted(r.name for r in records), MAX_VALIDATION_IMAGES, cfg.seed))
        callbacks.on_status(f"validation: using {MAX_VALIDATION_IMAGES} of the {len(records)} images in "
                            f"{folder.name} (chosen by the seed), so that validating stays quick")
        records = [r for r in records if r.name in picked]
    return sorted(records, key=lambda r: r.name)


def _seeded_pick(names: List[str], count: int, seed: int) -> List[str]:
    # Its own stream (not the training order's), stable across runs and Python versions (str seed → sha512).
    return random.Random(f"lora-scripts:validation:{seed}").sample(names, count)


def _warn_duplicates(train: List[ImageRecord], held: List[ImageRecord], callbacks: Callbacks) -> None:
    trained = {r.content_hash: r.name for r in train}
    same = [f"{r.name} = {trained[r.content_hash]}" for r in held if r.content_hash in trained]
    if same:
        callbacks.on_status(f"warning: {len(same)} validation image(s) are also trained on (same file): "
                            f"{', '.join(same[:5])}. Their val_loss measures memorisation.")


def validation_id(records: List[ImageRecord], cfg: TrainConfig) -> str:
    """What makes val_loss values comparable: the images, their captions and the timesteps."""
    return f"{dataset_hash(records)}:{cfg.validation_timesteps}"


def fixed_timesteps(num_train_timesteps: int, count: int) -> List[int]:
    """`count` timesteps at the middle of equal slices of [0, num_train_timesteps): 125, 375, 625, 875 for 4."""
    return [int((k + 0.5) * num_train_timesteps / count) for k in range(count)]


def _noise_seed(seed: int, name: str) -> int:
    return int(hashlib.sha1(f"lora-scripts:validation:{seed}:{name}".encode()).hexdigest()[:15], 16)


# -- scoring -----------------------------------------------------------------------------------

@dataclass
class _Item:
    record: ImageRecord
    latent: Any  # torch.Tensor C×h×w on the CPU
    size: Tuple[int, int]  # SDXL conditioning: original size, crop top-left, target size (h, w)
    crop: Tuple[int, int]
    target: Tuple[int, int]


class Validator:
    """Scores the run's current weights on its validation images (`measure`)."""

    def __init__(self, run: Any) -> None:
        self.run = run
        self.records: List[ImageRecord] = list(run.val_records)
        self.id = validation_id(self.records, run.cfg)
        self.items: List[_Item] = []

    def prepare(self, callbacks: Callbacks) -> None:
        """Encode the latents now, while the VAE is still loaded (the latent cache is used when on)."""
        cfg = self.run.cfg
        buckets = make_buckets(cfg) if cfg.enable_bucket else []
        self.items = []
        for record in self.records:
            bucket = assign_bucket(record.width, record.height, buckets, cfg)
            crop = plan_crop(record, bucket)  # centre, no flip
            size, top_left, target = crop.conditioning(record, bucket)
            latent = batches.latent(self.run, record, bucket, crop).detach().to("cpu")
            self.items.append(_Item(record, latent, size, top_left, target))
        share = self.expected_share()
        callbacks.on_status(f"validation: {len(self.items)} image(s) × {cfg.validation_timesteps} timesteps, about "
                            f"{100 * share:.0f} % of the training time" + (
                                "; raise save_steps or lower validation_timesteps to spend less" if share > 0.1
                                else ""))

    def expected_share(self) -> float:
        """Validation time / training time, predicted: a pass is images × timesteps forwards, a step's image a
        forward and a backward (≥ 2 forwards: bench/validation_cost.py measures 2.3 for SD1.5)."""
        run, cfg = self.run, self.run.cfg
        passes = (run.total_steps - 1) // cfg.save_steps + 1 if cfg.save_steps else 1
        scored = passes * len(self.records) * cfg.validation_timesteps
        return scored / (2.0 * run.total_steps * cfg.batch_size * cfg.gradient_accumulation_steps)

    def measure(self) -> float:
        """The mean loss over images × fixed timesteps, in eval mode; the run goes back to training mode."""
        import torch

        run = self.run
        objective.set_train_mode(run, False)
        try:
            with torch.no_grad():
                total = sum(self._image_loss(item) for item in self.items)
        finally:
            objective.set_train_mode(run, True)
        return total / (len(self.items) * run.cfg.validation_timesteps)

    def _image_loss(self, item: _Item) -> float:
        """The summed loss of one image at every fixed timestep, in chunks of at most batch_size."""
        import torch

        run, cfg, dev = self.run, self.run.cfg, self.run.device
        count = cfg.validation_timesteps
        sched = run.components.noise_scheduler
        timesteps = torch.tensor(fixed_timesteps(sched.config.num_train_timesteps, count))
        latents = item.latent.float()[None].expand(count, *item.latent.shape)
        generator = torch.Generator("cpu").manual_seed(_noise_seed(cfg.seed, item.record.name))
        noise = objective.gaussian_noise(cfg, latents.shape, generator)
        with objective.autocast(run):
            hidden, pooled = objective.text_conditioning(run, [item.record.caption])
        total = 0.0
        for start in range(0, count, cfg.batch_size):
            part = slice(start, min(count, start + cfg.batch_size))
            n = part.stop - part.start
            added = objective.added_conditioning(run, None if pooled is None else pooled.expand(n, -1), [item.size] * n,
                                [item.crop] * n, [item.target] * n)
            losses = objective.image_losses(run, latents[part].to(dev), noise[part].to(dev), timesteps[part].to(dev),
                                  hidden.expand(n, -1, -1), added)
            total += float(losses.double().sum())
        return total

