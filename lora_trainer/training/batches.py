"""What a training step reads: each image's latent (from the cache, or freshly encoded), its crop and flip,
and the caches of latents and text embeddings filled before the first step.

Every random choice about an image (crop, flip, caption dropout and shuffle, noise, timestep) derives from
its `place` in the run (seed, epoch, batch, place in the global batch), so a resumed run, or another
process, makes the same choice.
"""

from __future__ import annotations

import random
from typing import Any, Optional

import torch

from ..callbacks import Callbacks
from ..config import TrainConfig
from ..data.dataset import epoch_batches, plan_crop, prepare_image, prepare_mask
from ..data.latents import encode_pixels
from ..data.masks import latent_mask
from .memory import release
from .objective import autocast


def batch_latents(run: Any, images: list, epoch: int, index: int):
    """Latents of (place in the batch, record, bucket) from the cache, or freshly encoded; SDXL's size
    conditioning; and with masked_loss each image's mask at latent size (B × 1 × h × w), else None."""
    cfg = run.cfg
    out, sizes, crops, targets, masks = [], [], [], [], []
    for i, record, bucket in images:
        flip = cfg.flip_aug and _sample_rng(cfg.seed, epoch, index, i).random() < 0.5
        crop = plan_crop(record, bucket, flip, _crop_rng(cfg, record, epoch, index, i))
        original, top_left, target = crop.conditioning(record, bucket)
        sizes.append(original)
        crops.append(top_left)
        targets.append(target)
        out.append(latent(run, record, bucket, crop))
        if cfg.masked_loss:
            masks.append(batch_mask(run, record, bucket, crop, tuple(out[-1].shape[-2:])))
    return torch.stack(out), sizes, crops, targets, torch.stack(masks) if masks else None


def batch_mask(run: Any, record: Any, bucket: Any, crop: Any, latent_hw: tuple) -> torch.Tensor:
    """One image's mask at latent size, decoded once per crop: kept in memory like the latents when the crops are
    fixed (no random_crop, or cached latents), so a step reads no mask file after the first epoch."""
    def make() -> torch.Tensor:
        return latent_mask(prepare_mask(record, bucket, crop), latent_hw)

    if run.cfg.random_crop and not run.cfg.cache_latents:  # a new crop every step: nothing to keep
        return make()
    key = (record.name, bucket, crop)
    if key not in run.mask_cache:
        run.mask_cache[key] = make()
    return run.mask_cache[key]


def latent(run: Any, record: Any, bucket: Any, crop: Any) -> torch.Tensor:
    """One image's latent: decoded and VAE-encoded only when the cache does not have it."""
    def encode() -> torch.Tensor:
        prepared = prepare_image(record, bucket, crop=crop)
        return encode_pixels(run.components.vae, prepared.pixels[None])[0]

    if run.latent_cache is None:
        return encode()
    key = run.latent_cache.key(record.content_hash, bucket, (crop.top, crop.left), crop.flip)
    return run.latent_cache.get(key, encode)


def _crop_rng(cfg: TrainConfig, record: Any, epoch: int, index: int, i: int) -> Optional[random.Random]:
    if not cfg.random_crop:
        return None
    if cfg.cache_latents:  # one crop per image, chosen once, so the cache stays bounded
        return random.Random(f"{cfg.seed}:{record.name}")
    return _sample_rng(cfg.seed, epoch, index, i)


def _sample_rng(seed: int, epoch: int, index: int, i: int) -> random.Random:
    # Per-sample RNGs derived from the position: a resumed run makes the same choices.
    return random.Random(place(seed, epoch, index, i))


def place(seed: int, epoch: int, index: int, i: int) -> str:
    """An image's place in the run (epoch, batch, place in the global batch): what its random draws derive from."""
    return f"{seed}:{epoch}:{index}:{i}"


def fill_latent_cache(run: Any, cb: Callbacks) -> None:
    """Encode every latent the run will need up front, then move the VAE off the GPU.

    Several processes encode a share each into the disk cache, wait for each other, then read the rest.
    """
    cfg, procs = run.cfg, run.processes
    batches = epoch_batches(run.records, cfg, 0, cfg.seed, procs.world)
    todo = list({(record.name, bucket): (record, bucket, index, i)
                 for index, batch in enumerate(batches) for i, (record, bucket) in enumerate(batch)}.values())

    def cache(items: list, say: str = "") -> None:
        for done, (record, bucket, index, i) in enumerate(items, 1):
            for flip in (False, True) if cfg.flip_aug else (False,):
                latent(run, record, bucket, plan_crop(record, bucket, flip, _crop_rng(cfg, record, 0, index, i)))
            if say and (done == len(items) or done % 25 == 0):
                cb.on_status(f"{say} {done}/{len(items)}")

    cache(todo[procs.rank::procs.world], "caching latents")
    if procs.many:
        procs.wait_for_all()
        cache(todo)  # the others' shares from the disk (encoded here if this machine does not see their files)
    _discard_after_caching(run, run.components.vae)  # every latent is cached now: its memory goes to training
    release(collect=False)


def fill_text_cache(run: Any, cb: Callbacks) -> None:
    """Encode every caption the run can use up front, then move the text encoders off the GPU.

    Several processes encode a share each and pass the embeddings to each other.
    """
    procs, memory = run.processes, run.text_cache.memory
    captions = sorted({record.caption for record in run.records + run.val_records})
    if run.cfg.caption_dropout_rate:
        captions.append("")
    mine = captions[procs.rank::procs.world]
    with autocast(run):
        for start in range(0, len(mine), 16):
            run.text_cache(mine[start:start + 16])
    if procs.many:
        on_cpu = {c: tuple(None if t is None else t.cpu() for t in memory[c]) for c in mine}
        for share in procs.gather(on_cpu):
            memory.update({c: tuple(None if t is None else t.to(run.device) for t in pair)
                           for c, pair in share.items()})
    cb.on_status(f"cached {len(captions)} text embeddings")
    for te in run.components.text_encoders:
        _discard_after_caching(run, te)
    release(collect=False)  # what the encoders held goes back to the system before the first step


def _discard_after_caching(run: Any, module: torch.nn.Module) -> None:
    """Once its cache is filled, a VAE or text encoder is only needed again for sample grids."""
    if run.owns_components and not run.cfg.sample_prompts:
        module.to("meta")  # frees its weights now: the rest of the run never calls it
    else:
        module.to("cpu")
