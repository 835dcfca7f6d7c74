"""`train --gpus N`: start N training processes through torchrun's own launcher, and say plainly how it ended.

One machine: a free port is picked (torchrun --standalone). Several machines: the same command on each
with --nnodes M --rdzv-endpoint HOST:PORT (c10d rendezvous, HOST being one of them). Each process runs
`python -m lora_trainer train` with the same arguments and joins the process group (distributed.py).

Ctrl-C: torchrun starts each process in a session of its own, so the terminal's SIGINT reaches only the
launcher, which passes it on; the processes stop together after the current step and rank 0 saves the
state (a second Ctrl-C aborts, as in a single process). torchrun's own handling would give them 30 s.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import sys
import time
import uuid
from typing import List, Optional

from ..errors import ConfigError

STOPPED = 3  # a worker's exit status after a requested stop (1 is also Python's for a crash: keep them apart)
ERROR = 2  # the CLI's status for an error the user can fix (its one line is already printed)


def check_gpus(gpus: int, device: str) -> None:
    """`--gpus N` against what this machine has: N GPUs (device auto/cuda) or N CPU processes (device: cpu)."""
    import torch

    if gpus < 1:
        raise ConfigError(f"--gpus {gpus}: give the number of processes on this machine, 1 or more.")
    if device == "cpu":
        return
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible == 0:
        raise ConfigError(f"--gpus {gpus}, but no CUDA GPU is visible. Set device: cpu to train with {gpus} CPU "
                          "processes, or leave --gpus out.")
    if gpus > visible:
        raise ConfigError(f"--gpus {gpus}, but this machine shows {visible} GPU{'s' * (visible > 1)} "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): use --gpus "
                          f"{visible} or fewer.")


def reach_endpoint(endpoint: str, timeout: float) -> str:
    """HOST:PORT checked before any process starts, so that a wrong one is one line, not a minute of retries.

    On the machine HOST names, the port must be free (this launcher hosts the rendezvous there); elsewhere, wait
    up to `timeout` seconds for HOST to open it (the first machine may start later).
    """
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--rdzv-endpoint {endpoint}: give HOST:PORT, e.g. node0.example:29500 (the same on every "
                          "machine).")
    try:
        address = socket.gethostbyname(host)
    except OSError:
        raise ConfigError(f"--rdzv-endpoint {endpoint}: no machine is known by the name {host} here. Give the first "
                          "machine's address as every machine can resolve it.") from None
    if _is_this_machine(host, address):
        if not _port_free(int(port)):
            raise ConfigError(f"port {port} is in use on this machine ({host}): pick a free port for "
                              "--rdzv-endpoint, the same on every machine.")
    elif not _wait_for(address, int(port), timeout):
        raise ConfigError(f"could not reach {endpoint} within {timeout:g} s. Start the command on {host} (it hosts the "
                          "meeting), and check the address and that the port is open between the machines.")
    return f"{host}:{port}"


def _is_this_machine(host: str, address: str) -> bool:
    if address.startswith("127."):
        return True
    mine = {socket.gethostname(), socket.getfqdn()}
    try:
        mine |= set(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    return host in mine or address in mine


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
            return True
        except OSError:
            return False


def _wait_for(address: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((address, port), timeout=max(0.1, min(3.0, deadline - time.monotonic()))).close()
            return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def launch(train_args: List[str], gpus: int, device: str, nnodes: int = 1, endpoint: Optional[str] = None,
           join_timeout: float = 900) -> int:
    """Run `python -m lora_trainer train *train_args` in `gpus` processes per machine; the CLI's exit status."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    check_gpus(gpus, device)
    if nnodes < 1:
        raise ConfigError(f"--nnodes {nnodes}: give the number of machines taking part, 1 or more.")
    if nnodes > 1 and not endpoint:
        raise ConfigError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT: one of the machines, the same on "
                          "every one.")
    endpoint = reach_endpoint(endpoint, join_timeout) if endpoint else "localhost:0"  # port 0: a free one
    if "OMP_NUM_THREADS" not in os.environ:  # torchrun's habit: processes must not fight over the cores
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // gpus))
    forwarding = os.path.exists("/proc/self/stat")  # finding the processes to pass Ctrl-C on to needs /proc
    settings = dict(min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=gpus, rdzv_backend="c10d",
                    rdzv_endpoint=endpoint, rdzv_configs={"timeout": int(join_timeout)}, max_restarts=0,
                    run_id=f"lora-scripts-{endpoint}" if nnodes > 1 else uuid.uuid4().hex)
    if forwarding:
        settings["signals_to_handle"] = "SIGTERM,SIGHUP,SIGQUIT"  # SIGINT is ours to pass on
    known = {f.name for f in dataclasses.fields(LaunchConfig)}
    config = LaunchConfig(**{k: v for k, v in settings.items() if k in known})
    module = (__package__ or "lora_trainer.training").rpartition(".")[0]  # the core, under the name it was imported by
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # we say how it ended ourselves
    previous = signal.signal(signal.SIGINT, _pass_on_interrupt) if forwarding else None
    try:
        elastic_launch(config, sys.executable)("-m", module, "train", *train_args)
        return 0
    except ChildFailedError as e:
        return _report(e)
    except RendezvousError as e:
        where = "" if nnodes == 1 else f" at {endpoint}"
        raise ConfigError(f"the processes could not meet{where} ({_first_line(e)}). Check that every machine uses "
                          f"the same --rdzv-endpoint and --nnodes, that {endpoint.rpartition(':')[0]} can be "
                          "reached from each and its port is open.") from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _pass_on_interrupt(signum, frame) -> None:
    """Ctrl-C to every training process this launcher started (each leads its own process group)."""
    for pid in child_pids(os.getpid()):
        try:
            os.killpg(pid, signal.SIGINT)
        except OSError:
            continue  # it ended meanwhile


def child_pids(parent: int) -> List[int]:
    """The processes whose parent is `parent`, read from /proc (Linux)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                if entry.isdigit() and fh.read().rsplit(")", 1)[1].split()[1] == str(parent):
                    found.append(int(entry))
        except (OSError, IndexError):
            continue  # not a process, or it ended meanwhile
    return found


def _report(error) -> int:
    """The exit status for how the processes ended; a line when one failed (its own message is above)."""
    codes = {rank: failure.exitcode for rank, failure in error.failures.items()}
    if all(code == STOPPED for code in codes.values()):
        return 1  # a requested stop: rank 0 said where and how to resume
    # The one that failed by itself (an exit status of its own), not those torchrun ended after it (signals).
    rank = min(codes, key=lambda r: (codes[r] < 0, codes[r] != ERROR, r))
    code = codes[rank]
    how = "with the error above" if code == ERROR else \
        f"by signal {-code}" if code < 0 else f"with exit status {code} (its message is above)"
    print(f"error: process {rank} ended {how}; the other processes were stopped. Nothing after the last "
          "checkpoint was saved.", file=sys.stderr)
    return ERROR if code == ERROR else 1


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
