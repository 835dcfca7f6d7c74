"""Resumable training state: everything needed to continue a run exactly where it stopped.

Each checkpoint writes `output_dir/state/step-NNNNNNNN/` with the LoRA in fp32, the optimizer,
LR scheduler and grad-scaler states, every RNG state, the position in the data, and hashes of
the dataset and of the config fields that change the math. `--resume` refuses a folder whose
hashes do not match, naming what differs: a run never silently restarts at step 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ..errors import ResumeError
from ..files import usual_mode

STATE_VERSION = 1
STATE_FILE = "state.json"
# Config fields that may change between a run and its resume without changing the math.
RESUMABLE_CHANGES = {
    "epochs", "max_train_steps", "save_steps", "save_last_n", "save_precision", "sample_prompts",
    "sample_every_steps", "sample_strengths", "sample_steps", "output_dir", "output_name", "device",
    "base_model", "init_lora", "train_data_dir", "metadata_path", "gradient_checkpointing", "cache_latents",
    "cache_text_embeddings", "allow_ckpt", "base_precision", "offload", "memory_budget_gb",
    # Validation only measures: its images, noise levels and best file may change (validation_split may not:
    # it decides which images are trained on). A changed validation set starts the best val_loss afresh.
    "validation_dir", "validation_timesteps", "save_best",
    # Checked as the global batch (batch_size × processes) instead: what the batches and draws depend on.
    "batch_size",
}


def math_config(cfg: Any) -> Dict[str, Any]:
    return {k: v for k, v in cfg.to_dict().items() if k not in RESUMABLE_CHANGES}


def dataset_hash(records: List[Any]) -> str:
    h = hashlib.sha1()
    for r in sorted(records, key=lambda r: r.name):
        h.update(f"{r.name}\0{r.content_hash}\0{r.caption}\n".encode())
    return h.hexdigest()


@dataclass
class Position:
    step: int = 0          # optimizer steps done
    epoch: int = 0         # epoch in progress
    batch: int = 0         # micro-batches of that epoch already consumed


def save_state(folder: Path, position: Position, lora: Dict[str, torch.Tensor], trainer: Dict[str, Any],
               cfg: Any, data_hash: str, keep_last: int, validation: Optional[Dict[str, Any]] = None,
               processes: int = 1) -> Path:
    """Write one state folder atomically (temp folder + rename) and prune old ones.

    `validation` (JSON-able: the validation set's id and the best val_loss so far) is kept for a resume.
    `processes` is how many shared each batch: a resume may use another count with the same global batch.
    """
    from safetensors.torch import save_file

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step-{position.step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-state-", dir=root))
    try:
        save_file({k: v.float().contiguous() for k, v in lora.items()}, str(tmp / "lora.safetensors"))
        torch.save(trainer, tmp / "trainer.pt")
        meta = {"version": STATE_VERSION, "step": position.step, "epoch": position.epoch,
                "batch": position.batch, "dataset_hash": data_hash, "config": math_config(cfg),
                "name": cfg.name, "validation": validation or {}, "processes": processes,
                "global_batch": cfg.batch_size * processes}
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        usual_mode(tmp)  # mkdtemp's folder and safetensors' file are private otherwise
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if keep_last:
        for old in list_states(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def list_states(root: Path) -> List[Path]:
    return sorted(p for p in Path(root).glob("step-*") if (p / STATE_FILE).is_file())


def find_state(path: Path) -> Path:
    """A state folder itself, or the newest one under `output_dir/state` or `state/`."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    for root in (path / "state", path):
        states = list_states(root) if root.is_dir() else []
        if states:
            return states[-1]
    raise ResumeError(f"{path} holds no training state (no {STATE_FILE}). Point --resume at the run's "
                      "output_dir or at one of its state/step-… folders.")


@dataclass
class LoadedState:
    folder: Path
    position: Position
    lora: Dict[str, torch.Tensor]
    trainer: Dict[str, Any]
    validation: Optional[Dict[str, Any]] = None  # what save_state was given: the best val_loss so far


def load_state(path: Path, cfg: Any, data_hash: str, processes: int = 1) -> LoadedState:
    """Read and check a state folder against this run's config, dataset and global batch."""
    from safetensors.torch import load_file

    folder = find_state(path)
    try:
        meta = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ResumeError(f"{folder / STATE_FILE} cannot be read ({e}).") from None
    if meta.get("version") != STATE_VERSION:
        raise ResumeError(f"{folder} was written by another version of lora-scripts.")
    changed = [k for k, v in math_config(cfg).items() if meta.get("config", {}).get(k, v) != v]
    if changed:
        diffs = ", ".join(f"{k} ({meta['config'].get(k)!r} → {getattr(cfg, k)!r})" for k in changed[:5])
        raise ResumeError(f"{folder} was trained with other settings: {diffs}. Resume with the same config, "
                          "or start a new run with another output_dir.")
    _check_global_batch(folder, meta, cfg.batch_size, processes)
    if meta.get("dataset_hash") != data_hash:
        raise ResumeError(f"{folder} was trained on other images or captions than {cfg.train_data_dir} holds now. "
                          "Restore the images, or start a new run (init_lora can continue from its LoRA).")
    for needed in ("lora.safetensors", "trainer.pt"):
        if not (folder / needed).is_file():
            raise ResumeError(f"{folder} is incomplete: {needed} is missing.")
    trainer = torch.load(folder / "trainer.pt", map_location="cpu", weights_only=True)
    position = Position(meta["step"], meta["epoch"], meta["batch"])
    return LoadedState(folder, position, load_file(str(folder / "lora.safetensors")), trainer,
                       meta.get("validation") or {})


def _check_global_batch(folder: Path, meta: Dict[str, Any], batch_size: int, processes: int) -> None:
    """A run resumes exactly on any process count whose batch_size × processes is the state's: the batches and each
    image's draws depend on the global batch only (see distributed.py)."""
    was = int(meta.get("processes", 1))
    was_batch = int(meta.get("global_batch", meta.get("config", {}).get("batch_size", batch_size)))
    if was_batch == batch_size * processes:
        return
    if was_batch % processes == 0:
        fix = f"set batch_size: {was_batch // processes} for {processes} process{'es' * (processes > 1)}"
    else:
        fix = f"use {was} process{'es' * (was > 1)} with batch_size: {was_batch // was}"
    raise ResumeError(f"{folder} was trained with a global batch of {was_batch} ({was} process{'es' * (was > 1)} × "
                      f"batch_size {was_batch // was}); this run's is {batch_size * processes} ({processes} × "
                      f"{batch_size}). To resume exactly, {fix}.")


def rng_state() -> Dict[str, Any]:
    """The global generators' states: LoRA dropout draws from them (everything else is drawn per image from the
    seed and its place, see train.py). Every process starts from the same seed and draws alike, so rank 0's
    state serves them all."""
    state: Dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_state(output_dir: Path) -> Optional[Path]:
    states = list_states(Path(output_dir) / "state")
    return states[-1] if states else None
