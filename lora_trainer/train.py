"""The training loop: batch → noise → timesteps → prediction → loss → step → log/save/sample.

`train()` is the one entry point the CLI, the hosts and the tests call. It reports through a
`Callbacks` object and asks the host (through `HostInterface`) to free and restore its GPU
memory around the run.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from .callbacks import Callbacks, HostInterface, MultiCallbacks
from .config import TrainConfig
from .dataset import epoch_batches, plan_crop, prepare_image, process_caption
from .distributed import current
from .errors import TrainingError
from .latents import encode_pixels
from .memory import back_off, fit_budget, forget_frames, release, start_of_step
from .train_setup import Run, check_inputs, prepare_run


@dataclass
class TrainResult:
    lora_path: Optional[Path]      # the finished LoRA (None if stopped early)
    last_checkpoint: Optional[Path]
    state_dir: Optional[Path]      # resumable state of the last checkpoint
    steps: int
    stopped: bool
    losses: List[float]
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (image, why): what the scan left out
    val_losses: List[Tuple[int, float]] = field(default_factory=list)  # (step, val_loss) of this session's passes


def train(cfg: TrainConfig, callbacks: Optional[Callbacks] = None, host: Optional[HostInterface] = None,
          base_weights: Optional[Mapping[str, torch.Tensor]] = None, base_name: Optional[str] = None,
          resume: Optional[str] = None, components: Any = None) -> TrainResult:
    """Train a LoRA as `cfg` says. `base_weights` is a host's in-memory state dict (original layout).

    Every run writes `output_dir/logs` (TensorBoard + train.jsonl), whichever front end started it. Under
    torchrun (see distributed.py) every process calls this; only rank 0 writes and returns the LoRA's path.
    """
    from .checkpoints import Checkpointer, NoWrites
    from .monitor import log_callbacks

    cb = callbacks or Callbacks()
    host = host or HostInterface()
    procs = current()
    inputs = check_inputs(cfg, cb, resume, procs)  # bad images or a foreign resume folder: the host keeps its GPU
    loggers = log_callbacks(Path(cfg.output_dir), cb) if procs.main else []
    cb = MultiCallbacks(cb, *loggers)
    host.free_gpu()
    run = checkpointer = None
    try:
        # After free_gpu: "auto" counts what the host freed. Every process takes rank 0's plan: one global batch.
        cfg = procs.from_main(fit_budget(cfg, cb, base_weights, components))
        run = prepare_run(cfg, cb, base_weights, base_name, resume, components, inputs, procs)
        checkpointer = Checkpointer(run, cb, host) if procs.main else NoWrites()
        losses, stopped = _loop(run, cb, checkpointer)
        if stopped:
            state = checkpointer.save_checkpoint(final=False)
            cb.on_status(f"stopped at step {run.position.step}; resume with --resume {cfg.output_dir}")
            return TrainResult(None, checkpointer.last_file, state, run.position.step, True, losses,
                               inputs.skipped, checkpointer.val_losses)
        lora_path = checkpointer.save_final()
        return TrainResult(lora_path, checkpointer.last_file, checkpointer.last_state, run.position.step, False,
                           losses, inputs.skipped, checkpointer.val_losses)
    except BaseException as err:
        forget_frames(err)  # whoever keeps the error must not keep the run's models and activations
        raise
    finally:
        if run is not None:
            _release(run)
        run = checkpointer = None
        release(cuda=True)  # before the host's model goes back: it gets the memory the run freed
        host.restore_gpu()
        for logger in loggers:
            logger.close()


def _loop(run: Run, cb: Callbacks, checkpointer: Any) -> "tuple[List[float], bool]":
    cfg, pos, procs = run.cfg, run.position, run.processes
    losses: List[float] = []
    if checkpointer.validator is not None:
        checkpointer.validator.prepare(cb)  # before the caches below send the VAE away
    if run.latent_cache is not None:
        _fill_latent_cache(run, cb)
    if run.text_cache is not None:
        _fill_text_cache(run, cb)
    _set_train_mode(run, True)
    cb.on_status(f"training {run.total_steps} steps")
    cb.on_progress(pos.step, run.total_steps)
    step_loss, micro, t0 = 0.0, 0, time.perf_counter()
    while pos.step < run.total_steps:
        batches = epoch_batches(run.records, cfg, pos.epoch, cfg.seed, procs.world)
        while pos.batch < len(batches) and pos.step < run.total_steps:
            if micro == 0:
                # Only between optimizer steps (the state stays exact), and all processes at the same one.
                if procs.total([cb.should_stop()])[0]:
                    return losses, True
                step_start = start_of_step(run)
            try:
                loss = _micro_step(run, batches[pos.batch], pos.epoch, pos.batch) / cfg.gradient_accumulation_steps
                _backward(run, loss)
                step_loss += loss.item()
                micro, pos.batch = micro + 1, pos.batch + 1
                step_done = micro == cfg.gradient_accumulation_steps or pos.batch == len(batches)
                if step_done:
                    step_loss = procs.total([step_loss])[0] / procs.world  # the global batch's, as one process has it
                    _check_finite(step_loss, pos.step + 1)  # before the update: weights and checkpoints stay clean
                    _optimizer_step(run)
            except torch.cuda.OutOfMemoryError as err:  # step down a setting and redo this step exactly
                loss = None  # the failed step's graph
                back_off(run, cb, step_start, err)
                step_loss, micro, t0 = 0.0, 0, time.perf_counter()
                continue
            if step_done:
                pos.step += 1
                losses.append(step_loss)
                cb.on_loss(pos.step, step_loss, run.lr_scheduler.get_last_lr()[0])
                cb.on_progress(pos.step, run.total_steps)
                run.info["step_time"] = time.perf_counter() - t0
                step_loss, micro, t0 = 0.0, 0, time.perf_counter()
                checkpointer.after_step()
        if pos.batch >= len(batches):
            pos.epoch, pos.batch = pos.epoch + 1, 0
    return losses, False


def _check_finite(step_loss: float, step: int) -> None:
    if not math.isfinite(step_loss):
        raise TrainingError(f"The loss became {step_loss} at step {step}. Lower learning_rate or use mixed_precision: "
                            "bf16 / no instead of fp16, and start again (init_lora: <the last checkpoint> keeps what "
                            "was learned).")


def _micro_step(run: Run, batch: list, epoch: int, index: int) -> torch.Tensor:
    """Loss of one bucket-shaped micro-batch: the mean over its images, or this process's part of it.

    Each image's noise, timestep and caption dropout/shuffle are drawn from the seed and its place in the
    (global) batch, like its crop and flip: whichever process trains it, and after any resume, it gets the same.
    """
    cfg, dev = run.cfg, run.device
    places, weight = run.processes.share(len(batch), cfg.batch_size)
    latents, sizes, crops, targets = _batch_latents(run, [(i, *batch[i]) for i in places], epoch, index)
    captions = [process_caption(batch[i][0].caption, cfg, random.Random(f"{_place(cfg.seed, epoch, index, i)}:caption"))
                for i in places]
    draws = [_noise_and_timestep(run, latents.shape[1:], _place(cfg.seed, epoch, index, i)) for i in places]
    noise = torch.stack([n for n, _ in draws]).to(dev)
    timesteps = torch.tensor([t for _, t in draws], dtype=torch.long, device=dev)
    latents = latents.to(dev, torch.float32)

    def compute() -> torch.Tensor:  # text encoders and UNet in one forward: DDP syncs whatever of them trains
        with _autocast(run):
            hidden, pooled = _text(run, captions)
            added = _added_cond(run, pooled, sizes, crops, targets)
        return image_losses(run, latents, noise, timesteps, hidden, added).sum() * weight

    return run.replica(compute) if run.replica is not None else compute()


def _place(seed: int, epoch: int, index: int, i: int) -> str:
    """An image's place in the run (epoch, batch, place in the global batch): what its random draws derive from."""
    return f"{seed}:{epoch}:{index}:{i}"


def _noise_and_timestep(run: Run, shape: torch.Size, place: str) -> Tuple[torch.Tensor, int]:
    """One image's noise (with noise_offset) and timestep, from a generator seeded by its place alone."""
    seed = int.from_bytes(hashlib.sha256(f"{place}:noise".encode()).digest()[:8], "little") >> 1
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(shape, generator=generator)
    if run.cfg.noise_offset:
        noise += run.cfg.noise_offset * torch.randn((shape[0], 1, 1), generator=generator)
    steps = run.components.noise_scheduler.config.num_train_timesteps
    return noise, int(torch.randint(0, steps, (1,), generator=generator))


def image_losses(run: Run, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, hidden: torch.Tensor,
                 added: Any) -> torch.Tensor:
    """Per-image loss of the UNet's prediction: what training minimises and validation measures."""
    comps, cfg = run.components, run.cfg
    sched = comps.noise_scheduler
    with _autocast(run):
        noisy = sched.add_noise(latents, noise, timesteps)
        target = noise if comps.prediction_type == "epsilon" else sched.get_velocity(latents, noise, timesteps)
        pred = comps.unet(noisy, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if cfg.min_snr_gamma:
        loss = loss * _min_snr_weights(sched, timesteps, cfg.min_snr_gamma, comps.prediction_type)
    return loss


def _batch_latents(run: Run, images: list, epoch: int, index: int):
    """Latents of (place in the batch, record, bucket) from the cache, or freshly encoded; plus SDXL's size
    conditioning."""
    cfg = run.cfg
    out, sizes, crops, targets = [], [], [], []
    for i, record, bucket in images:
        flip = cfg.flip_aug and _sample_rng(cfg.seed, epoch, index, i).random() < 0.5
        crop = plan_crop(record, bucket, flip, _crop_rng(cfg, record, epoch, index, i))
        original, top_left, target = crop.conditioning(record, bucket)
        sizes.append(original)
        crops.append(top_left)
        targets.append(target)
        out.append(_latent(run, record, bucket, crop))
    return torch.stack(out), sizes, crops, targets


def _latent(run: Run, record: Any, bucket: Any, crop: Any) -> torch.Tensor:
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
    return random.Random(_place(seed, epoch, index, i))


def _fill_latent_cache(run: Run, cb: Callbacks) -> None:
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
                _latent(run, record, bucket, plan_crop(record, bucket, flip, _crop_rng(cfg, record, 0, index, i)))
            if say and (done == len(items) or done % 25 == 0):
                cb.on_status(f"{say} {done}/{len(items)}")

    cache(todo[procs.rank::procs.world], "caching latents")
    if procs.many:
        procs.wait_for_all()
        cache(todo)  # the others' shares from the disk (encoded here if this machine does not see their files)
    _discard_after_caching(run, run.components.vae)  # every latent is cached now: its memory goes to training
    release(collect=False)


def _fill_text_cache(run: Run, cb: Callbacks) -> None:
    """Encode every caption the run can use up front, then move the text encoders off the GPU.

    Several processes encode a share each and pass the embeddings to each other.
    """
    procs, memory = run.processes, run.text_cache.memory
    captions = sorted({record.caption for record in run.records + run.val_records})
    if run.cfg.caption_dropout_rate:
        captions.append("")
    mine = captions[procs.rank::procs.world]
    with _autocast(run):
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


def _text(run: Run, captions: List[str]):
    from .model import encode_text

    if run.text_cache is not None:
        hidden, pooled = run.text_cache(captions)
    else:
        hidden, pooled = encode_text(run.components, captions)
    return hidden.to(run.device), None if pooled is None else pooled.to(run.device)


def _added_cond(run: Run, pooled, sizes, crops, targets):
    from .model import unet_added_cond

    return unet_added_cond(run.components, pooled, sizes, crops, targets)


def _min_snr_weights(sched: Any, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ weighting (Hang et al. 2023): down-weight the easy, low-noise timesteps."""
    alphas = sched.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=gamma) / snr
    return weight if prediction_type == "epsilon" else torch.clamp(snr, max=gamma) / (snr + 1)


def _autocast(run: Run):
    if run.autocast_dtype is None:
        return nullcontext()
    return torch.autocast(run.device.type, dtype=run.autocast_dtype)


def _backward(run: Run, loss: torch.Tensor) -> None:
    (run.scaler.scale(loss) if run.scaler is not None else loss).backward()


def _optimizer_step(run: Run) -> None:
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    if run.cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(run.params, run.cfg.max_grad_norm)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)


def _set_train_mode(run: Run, training: bool) -> None:
    # train() only where LoRA dropout lives; the frozen base stays in eval (no base dropout).
    comps = run.components
    comps.unet.train(training)
    for te in comps.text_encoders:
        te.train(training and run.trains_text_encoder)


def _release(run: Run) -> None:
    """Give back what the run holds. Models the run loaded are emptied (their storage freed even if something
    still refers to them); models a caller passed in go back to the CPU for the caller to keep using."""
    comps = run.components
    for module in comps.models():
        module.to("meta" if run.owns_components else "cpu")
    run.optimizer.state.clear()
    for cache in (run.latent_cache, run.text_cache):
        if cache is not None:
            cache.memory.clear()


def _discard_after_caching(run: Run, module: torch.nn.Module) -> None:
    """Once its cache is filled, a VAE or text encoder is only needed again for sample grids."""
    if run.owns_components and not run.cfg.sample_prompts:
        module.to("meta")  # frees its weights now: the rest of the run never calls it
    else:
        module.to("cpu")
