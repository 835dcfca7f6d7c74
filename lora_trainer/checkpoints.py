"""Saving during and after a run: step checkpoints, resumable state, samples, the final LoRA.

Checkpoints are `<name>-step00000100.safetensors` (the last `save_last_n` kept) plus a state
folder each. The finished LoRA is `<name>.safetensors`; if that name is taken, a new version
name is used (`<name>-v2.safetensors`): a finished LoRA is never overwritten.

With validation, val_loss is measured before each step checkpoint and before the finished LoRA
(not at a stop: that save is an interruption), and is written into those files' metadata. With
`save_best`, the lowest so far is also written to `<name>-best.safetensors`. The run picks that
name at its first best (`<name>-best-v2.safetensors` when an earlier run's file is there, since a
finished file is never overwritten) and then overwrites only its own file; a resumed run keeps
the name and the best val_loss from its state, unless the validation set changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from .callbacks import Callbacks, HostInterface
from .export import SAVE_DTYPES, build_metadata, lora_state_dict, save_lora
from .files import unused_path
from .state import rng_state, save_state


class Checkpointer:
    def __init__(self, run: Any, callbacks: Callbacks, host: HostInterface) -> None:
        self.run = run
        self.cb = callbacks
        self.host = host
        self.last_file: Optional[Path] = None
        self.last_state: Optional[Path] = None
        self.step_files: List[Path] = sorted(Path(run.output_dir).glob(f"{run.cfg.name}-step*.safetensors"))
        self.validator = None
        self.val_losses: List[Tuple[int, float]] = []  # (step, val_loss) measured in this session
        self.best: Dict[str, Any] = {}  # {"val_loss", "step", "path"}: the lowest val_loss of the run so far
        if run.val_records:
            from .validation import Validator

            self.validator = Validator(run)
            saved = run.validation_state
            if saved.get("id") == self.validator.id:
                self.best = dict(saved.get("best") or {})
            elif saved.get("best"):
                callbacks.on_status("the validation images or validation_timesteps changed since the state: "
                                    "the best val_loss starts afresh")

    def after_step(self) -> None:
        cfg, step = self.run.cfg, self.run.position.step
        if cfg.save_steps and step % cfg.save_steps == 0 and step < self.run.total_steps:
            self.validate()
            self.save_checkpoint(final=False)
        if cfg.sample_prompts and cfg.sample_every_steps and step % cfg.sample_every_steps == 0 \
                and step < self.run.total_steps:
            self.sample(step)

    def save_checkpoint(self, final: bool) -> Path:
        """A step LoRA file and the resumable state beside it."""
        run, cfg = self.run, self.run.cfg
        step = run.position.step
        path = Path(run.output_dir) / f"{cfg.name}-step{step:08d}.safetensors"
        self.last_file = self._write(path, overwrite=True)
        if path not in self.step_files:
            self.step_files.append(path)
        if cfg.save_last_n:
            for old in self.step_files[:-cfg.save_last_n]:
                old.unlink(missing_ok=True)
            self.step_files = self.step_files[-cfg.save_last_n:]
        trainer = {
            "optimizer": run.optimizer.state_dict(),
            "lr_scheduler": run.lr_scheduler.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler is not None else {},
            "rng": rng_state(),
            "started_at": run.started_at,
        }
        lora_fp32 = lora_state_dict(run.components, torch.float32)
        validation = {"id": self.validator.id, "best": self.best} if self.validator is not None else None
        self.last_state = save_state(Path(run.output_dir) / "state", run.position, lora_fp32, trainer, cfg,
                                     run.data_hash, keep_last=cfg.save_last_n, validation=validation,
                                     processes=run.processes.world)
        self.cb.on_saved(self.last_file, final)
        return self.last_state

    def save_final(self) -> Path:
        run, cfg = self.run, self.run.cfg
        self.validate()
        if cfg.save_steps:  # the end of the run is resumable too (extend epochs later)
            self.save_checkpoint(final=False)
        path = self._write(Path(run.output_dir) / f"{cfg.name}.safetensors", overwrite=False)
        host_dir = self.host.lora_dir()
        if host_dir is not None:  # publish into the host's LoRA folder under the same rule: no overwrite
            path = self._write(Path(host_dir) / path.name, overwrite=False)
            self.host.refresh_loras()
        self.cb.on_saved(path, True)  # the one report of the finished file (front ends word it themselves)
        if cfg.sample_prompts:
            self.sample(run.position.step)
        return path

    def validate(self) -> Optional[float]:
        """Measure val_loss (when the run validates), report it, and keep the best file when it is the lowest."""
        if self.validator is None:
            return None
        step = self.run.position.step
        val_loss = self.validator.measure()
        self.val_losses.append((step, val_loss))
        self.cb.on_validation(step, val_loss)
        self.cb.on_status(f"step {step}: val_loss {val_loss:.5g}")
        if self.best and val_loss >= self.best["val_loss"]:
            return val_loss
        self.best = {"val_loss": val_loss, "step": step, "path": self.best.get("path")}
        if self.run.cfg.save_best:
            name = Path(self.run.output_dir) / f"{self.run.cfg.name}-best.safetensors"
            path = Path(self.best["path"]) if self.best["path"] else unused_path(name)
            self.best["path"] = str(self._write(path, overwrite=True))
            self.cb.on_saved(path, False)
        return val_loss

    def sample(self, step: int) -> Optional[Path]:
        from .sample import render_grid

        run = self.run
        folder = Path(run.output_dir) / "samples"
        path = folder / f"{run.cfg.name}-step{step:08d}.png"
        image = render_grid(run.components, run.cfg.sample_prompts, run.cfg.sample_strengths, path,
                            seed=run.cfg.seed, steps=run.cfg.sample_steps, device=run.device)
        self.cb.on_sample(step, path, image)
        return path

    def _write(self, path: Path, overwrite: bool) -> Path:
        run = self.run
        info = dict(run.info, steps=run.position.step, epoch=run.position.epoch, started_at=run.started_at,
                    epochs=run.cfg.epochs)
        if self.val_losses and self.val_losses[-1][0] == run.position.step:  # measured on these weights
            info["val_loss"] = self.val_losses[-1][1]
        tensors = lora_state_dict(run.components, SAVE_DTYPES[run.cfg.save_precision])
        return save_lora(path, tensors, build_metadata(run.cfg, run.components, info), overwrite=overwrite)


class NoWrites:
    """A process other than rank 0 at the save points: it writes nothing (rank 0 writes for all) and validates
    nothing (rank 0 measures on the same weights)."""
    validator = None
    last_file = last_state = None

    def __init__(self) -> None:
        self.val_losses: List[Tuple[int, float]] = []

    def after_step(self) -> None:
        pass

    def save_checkpoint(self, final: bool) -> None:
        return None

    def save_final(self) -> None:
        return None
