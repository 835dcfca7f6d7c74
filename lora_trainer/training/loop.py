"""The training loop: batch → objective (noise, timestep, prediction, loss) → step → log/save/sample.

`train()` is the one entry point the CLI, the hosts and the tests call. It reports through a
`Callbacks` object and asks the host (through `HostInterface`) to free and restore its GPU
memory around the run.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Mapping, Optional, Tuple

import torch

from ..callbacks import Callbacks, HostInterface, MultiCallbacks
from ..config import TrainConfig
from ..data.dataset import epoch_batches, process_caption
from ..errors import TrainingError
from . import objective
from .batches import batch_latents, fill_latent_cache, fill_text_cache, place
from .distributed import current
from .budget import back_off, fit_budget, start_of_step
from .checkpoints import samples_at, saves_at
from .memory import forget_frames, release
from .optimizers import effective_lr, evaluating, train_mode
from .record import finish_record, reset_peak, write_used_config
from .setup import Run, check_inputs, prepare_run


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
    output_dir: Optional[Path] = None  # where it wrote: cfg.output_dir, or -v2, … when that held an earlier run


def train(cfg: TrainConfig, callbacks: Optional[Callbacks] = None, host: Optional[HostInterface] = None,
          base_weights: Optional[Mapping[str, torch.Tensor]] = None, base_name: Optional[str] = None,
          resume: Optional[str] = None, components: Any = None) -> TrainResult:
    """Train a LoRA as `cfg` says. `base_weights` is a host's in-memory state dict (original layout).

    Every run writes `output_dir/logs` (TensorBoard + train.jsonl), whichever front end started it. Under
    torchrun (see distributed.py) every process calls this; only rank 0 writes and returns the LoRA's path.
    """
    from .checkpoints import Checkpointer, NoWrites, fresh_output_dir
    from ..monitor import log_callbacks

    cb = callbacks or Callbacks()
    host = host or HostInterface()
    procs = current()
    inputs = check_inputs(cfg, cb, resume, procs)  # bad images or a foreign resume folder: the host keeps its GPU
    if resume is None:  # an earlier run's files in output_dir stay as they are: this one writes beside them
        cfg = procs.from_main(fresh_output_dir(cfg, cb if procs.main else Callbacks()))
    loggers = log_callbacks(Path(cfg.output_dir), cb) if procs.main else []
    cb = MultiCallbacks(cb, *loggers)
    host.free_gpu()
    reset_peak()
    started = time.perf_counter()
    run = checkpointer = None
    try:
        # After free_gpu: "auto" counts what the host freed. Every process takes rank 0's plan: one global batch.
        cfg = procs.from_main(fit_budget(cfg, cb, base_weights, components))
        run = prepare_run(cfg, cb, base_weights, base_name, resume, components, inputs, procs)
        if procs.main:
            write_used_config(run.output_dir, cfg)
        checkpointer = Checkpointer(run, cb, host) if procs.main else NoWrites()
        losses, stopped = _loop(run, cb, checkpointer)
        if stopped:
            with evaluating(run.optimizer):
                state = checkpointer.save_checkpoint(final=False)
            cb.on_status(f"stopped at step {run.position.step}; resume with --resume {cfg.output_dir}")
            if procs.main:
                finish_record(run, inputs, checkpointer.best, None, True, time.perf_counter() - started, cb)
            return TrainResult(None, checkpointer.last_file, state, run.position.step, True, losses,
                               inputs.skipped, checkpointer.val_losses, Path(cfg.output_dir))
        with evaluating(run.optimizer):  # a schedule-free optimizer's averaged weights are the LoRA
            lora_path = checkpointer.save_final()
        if procs.main:
            finish_record(run, inputs, checkpointer.best, lora_path, False, time.perf_counter() - started, cb)
        return TrainResult(lora_path, checkpointer.last_file, checkpointer.last_state, run.position.step, False,
                           losses, inputs.skipped, checkpointer.val_losses, Path(cfg.output_dir))
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
        fill_latent_cache(run, cb)
    if run.text_cache is not None:
        fill_text_cache(run, cb)
    objective.set_train_mode(run, True)
    train_mode(run.optimizer)  # a resumed schedule-free state was saved with its averaged weights
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
                cb.on_loss(pos.step, step_loss, effective_lr(run.optimizer, run.lr_scheduler))
                cb.on_progress(pos.step, run.total_steps)
                run.info["step_time"] = time.perf_counter() - t0
                step_loss, micro, t0 = 0.0, 0, time.perf_counter()
                due = saves_at(cfg, pos.step, run.total_steps) or samples_at(cfg, pos.step, run.total_steps)
                with evaluating(run.optimizer, on=due):  # on every process alike: their weights stay the same
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
    latents, sizes, crops, targets, masks = batch_latents(run, [(i, *batch[i]) for i in places], epoch, index)
    masks = None if masks is None else masks.to(dev)
    # class images (reg_data_dir) weigh prior_loss_weight, as in kohya's scripts
    image_weights = torch.tensor([cfg.prior_loss_weight if batch[i][0].is_reg else 1.0 for i in places], device=dev)
    captions = [process_caption(batch[i][0].caption, cfg, random.Random(f"{place(cfg.seed, epoch, index, i)}:caption"))
                for i in places]
    draws = [objective.draw(run, latents.shape[1:], place(cfg.seed, epoch, index, i)) for i in places]
    noise = torch.stack([n for n, _ in draws]).to(dev)
    timesteps = torch.tensor([t for _, t in draws], device=dev)  # integer steps; Flux: t in (0, 1)
    latents = latents.to(dev, torch.float32)

    def compute() -> torch.Tensor:  # text encoders and UNet in one forward: DDP syncs whatever of them trains
        with objective.autocast(run):
            hidden, pooled = objective.text_conditioning(run, captions)
            added = objective.added_conditioning(run, pooled, sizes, crops, targets)
        losses = objective.image_losses(run, latents, noise, timesteps, hidden, added, masks)
        return (losses * image_weights).sum() * weight

    return run.replica(compute) if run.replica is not None else compute()


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
    run.mask_cache.clear()


