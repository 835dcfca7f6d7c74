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

A new run (not a resume) into an output_dir that holds an earlier run's checkpoints, state, samples or
LoRA writes everything into the first free `<output_dir>-v2`, `-v3`, … instead (`fresh_output_dir`),
and says so: nothing an earlier run wrote is overwritten or pruned.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..callbacks import Callbacks, HostInterface
from ..adapters.export import SAVE_DTYPES, build_metadata, lora_state_dict, save_lora
from ..files import unused_path
from .state import rng_state, save_state


def earlier_run(output_dir: Path, name: str) -> List[str]:
    """What an earlier run of `name` left in `output_dir` that a new run would overwrite or prune."""
    found = [f"{sub}/" for sub in ("state", "samples", "logs") if (output_dir / sub).is_dir() and any((output_dir / sub).iterdir())]
    return found + sorted(p.name for p in output_dir.glob(f"{name}*.safetensors")
                          if p.stem == name or p.stem.startswith(f"{name}-step"))


def fresh_output_dir(cfg: Any, callbacks: Callbacks) -> Any:
    """`cfg`, or a copy that writes into the first free `<output_dir>-vN` when output_dir holds an earlier run."""
    folder = Path(cfg.output_dir)
    left = earlier_run(folder, cfg.name)
    if not left:
        return cfg
    new = _version(folder, 2)
    while new.exists():
        new = _version(folder, int(new.name.rsplit("-v", 1)[1]) + 1)
    shown = ", ".join(left[:3]) + (", …" if len(left) > 3 else "")
    callbacks.on_status(f"{folder} holds an earlier run ({shown}): this run writes into {new} "
                        f"(to continue the earlier one instead: --resume {folder})")
    return cfg.replace(output_dir=str(new))


def latest_run_dir(output_dir: str) -> str:
    """The newest of `output_dir`, `output_dir-v2`, … that exists: the run a plain "resume" continues."""
    folder, n = Path(output_dir), 2
    latest = folder
    while _version(folder, n).is_dir():
        latest, n = _version(folder, n), n + 1
    return str(latest)


def _version(folder: Path, n: int) -> Path:
    return folder.with_name(f"{folder.name}-v{n}")


def saves_at(cfg: Any, step: int, total: int) -> bool:
    """Whether the run validates and saves a step checkpoint after `step` (the end has its own save)."""
    return bool(cfg.save_steps) and step % cfg.save_steps == 0 and step < total


def samples_at(cfg: Any, step: int, total: int) -> bool:
    return bool(cfg.sample_prompts and cfg.sample_every_steps) and step % cfg.sample_every_steps == 0 and step < total


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
        if saves_at(cfg, step, self.run.total_steps):
            self.validate()
            self.save_checkpoint(final=False)
        if samples_at(cfg, step, self.run.total_steps):
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
        lora_fp32 = lora_state_dict(run.components, torch.float32, fused=False)  # the layers as trained
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
        from ..evaluate.sample import render_grid

        run = self.run
        folder = Path(run.output_dir) / "samples"
        path = folder / f"{run.cfg.name}-step{step:08d}.png"
        image = render_grid(run.components, run.cfg.sample_prompts, run.cfg.sample_strengths, path,
                            seed=run.cfg.seed, steps=run.cfg.sample_steps, device=run.device,
                            size=run.cfg.resolution if run.components.family == "flux" else None)
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
