"""Data-parallel training over several processes (torchrun + DDP): who is who, each one's share, agreeing.

Every process sees the same global batches, the ones a single process with batch_size × processes
sees, in the same order; each takes its slice (`share`) and weights its images so that DDP's
average of the gradients is the single process's mean over the global batch. What an image gets
(noise, timestep, crop, flip, caption dropout) is drawn from the seed and its place in the global
batch (train.py), so N processes at batch_size b train the LoRA one process at N × b trains.

Only rank 0 writes the LoRA, checkpoints, state, samples and logs; every rank writes its share of
the latent cache. The process group exists only in the CLI's torchrun workers (`process_group`):
the A1111/Forge tab and the ComfyUI nodes train in the host's own process, on its GPU.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, List, Sequence, Tuple

import torch

# Rank 0 samples and validates while the others wait at the next step: allow it minutes, not the default's 10.
WAIT = timedelta(minutes=60)


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The process that writes (rank 0)."""
        return self.rank == 0

    @property
    def many(self) -> bool:
        return self.world > 1

    def share(self, global_size: int, per_process: int) -> Tuple[List[int], float]:
        """(places in a global batch of `global_size` this process trains on, the loss weight of each image).

        Slices are `per_process` long in rank order, so a short final batch leaves the last ranks little or
        nothing. A rank with nothing still runs the batch's first image at weight 0: DDP's all-reduce needs
        every rank's gradients, and a zero weight adds exactly nothing.
        """
        places = list(range(self.rank * per_process, min(global_size, (self.rank + 1) * per_process)))
        if not places:
            return [0], 0.0
        return places, self.world / global_size  # DDP divides the sum by world: the global batch's mean

    def total(self, values: Sequence[float]) -> List[float]:
        """Element-wise sum of `values` over all processes (one small all-reduce)."""
        if not self.many:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=_collective_device())
        torch.distributed.all_reduce(t)
        return t.tolist()

    def wait_for_all(self) -> None:
        if self.many:
            torch.distributed.barrier()

    def from_main(self, value: Any) -> Any:
        """Rank 0's `value` on every process (a picklable object)."""
        if not self.many:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0, device=_collective_device())
        return box[0]

    def gather(self, value: Any) -> List[Any]:
        """Every process's `value`, in rank order."""
        if not self.many:
            return [value]
        out: List[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, value)
        return out


SINGLE = Processes()


def current() -> Processes:
    """This process's place in the process group; SINGLE when there is none (hosts, tests, a plain CLI run)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return Processes(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


@contextmanager
def process_group(device: str) -> Iterator[Processes]:
    """Join torchrun's process group for the run (nccl on CUDA, gloo on the CPU), and leave it after."""
    from ..errors import ConfigError

    if not launched_by_torchrun():
        yield SINGLE
        return
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = device != "cpu" and torch.cuda.is_available()
    if device.startswith("cuda") and not cuda:
        raise ConfigError(f"device: {device} was asked for but no CUDA GPU is visible. Use device: cpu to train "
                          "with several CPU processes.")
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"process {local_rank} on this machine has no GPU of its own (this machine shows "
                              f"{torch.cuda.device_count()}): start at most that many processes per machine.")
        torch.cuda.set_device(local_rank)  # "cuda" now means this process's GPU, everywhere in the run
    torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=WAIT)
    try:
        yield current()
    finally:
        torch.distributed.destroy_process_group()


def _collective_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _Trained(torch.nn.Module):
    """What DDP wraps: the models that carry trainable LoRA weights, run through one forward call."""

    def __init__(self, modules: Sequence[torch.nn.Module]) -> None:
        super().__init__()
        self.parts = torch.nn.ModuleList(modules)

    def forward(self, compute: Any) -> Any:
        return compute()


def replicate(modules: Sequence[torch.nn.Module], device: torch.device) -> torch.nn.Module:
    """A DDP wrapper over `modules` that syncs only the trainable (LoRA) weights.

    The frozen base weights are identical in every process already (same file) and may sit on the CPU
    (offload: blocks): DDP is told to ignore them, so it neither broadcasts nor checks them.
    """
    from torch.nn.parallel import DistributedDataParallel

    trained = _Trained(modules)
    ignore = [n for n, p in trained.named_parameters() if not p.requires_grad]
    ignore += [n for n, _ in trained.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(trained, ignore)
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" \
        else None
    # static_graph: every micro-batch uses the same weights in the same order, and reentrant gradient
    # checkpointing (transformers < 4.35 text encoders) needs it to find the gradients of checkpointed layers.
    # It cannot be combined with no_sync, so gradients are averaged after every micro-batch, not once per
    # accumulated step: the same sum, and LoRA gradients are small.
    return DistributedDataParallel(trained, device_ids=ids, static_graph=True)  # buffers ignored above: none to sync
