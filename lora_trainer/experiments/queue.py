"""The run queue: a folder of small JSON files under the output root, one per run, run one at a time in order.

`<root>/queue/0001.json` holds a run's whole config (fixed when it was added: a later edit of the YAML does
not change a queued run), its state — queued, running, stopped, done, failed, cancelled — its output folder
and its progress. Every write is atomic, so a crash leaves whole files. A run found `running` (its process
died: a crash, SIGKILL, a closed terminal) or `stopped` (Ctrl-C) is resumed first by the next `run`, from its
last saved state (save_steps), or started again in a fresh folder when it saved none.

`queue cancel` of a running run leaves `0001.cancel` beside its file; the runner looks for it between steps.
One runner at a time: `<root>/queue/runner.lock` names the process that runs the queue; a lock whose process
is gone is taken over.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from ..callbacks import Callbacks
from ..config import TrainConfig, config_from_dict
from ..errors import ConfigError, LoraTrainerError
from ..files import atomic_write_text

STATES = ("queued", "running", "stopped", "done", "failed", "cancelled")
INTERRUPTED = ("running", "stopped")
_IN_PROCESS = threading.Lock()  # the standalone UI and a WebUI run the queue in a thread of their own process


class Queue:
    def __init__(self, root: Any) -> None:
        self.folder = Path(root) / "queue"

    # -- the files ----------------------------------------------------------------------------
    def jobs(self) -> List[Dict[str, Any]]:
        """Every run in the queue, in the order they run (their ids)."""
        out = []
        for path in sorted(self.folder.glob("[0-9]*.json")):
            try:
                out.append(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                continue  # an id being claimed by `add` right now
        return out

    def get(self, job_id: str) -> Dict[str, Any]:
        path = self.folder / f"{str(job_id).zfill(4)}.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise ConfigError(f"The queue in {self.folder} has no run {job_id}: `queue list` shows the ids.") from None

    def save(self, job: Dict[str, Any], **changes: Any) -> Dict[str, Any]:
        job.update(changes)
        atomic_write_text(self.folder / f"{job['id']}.json", json.dumps(job, indent=1))
        return job

    def add(self, cfg: TrainConfig, sweep: Optional[str] = None) -> Dict[str, Any]:
        """Queue `cfg` after the runs already there; its id is claimed with an exclusive create (no two the same)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        n = max((int(p.stem) for p in self.folder.glob("[0-9]*.json") if p.stem.isdigit()), default=0) + 1
        while True:
            try:
                os.close(os.open(self.folder / f"{n:04d}.json", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                break
            except FileExistsError:
                n += 1
        job = {"id": f"{n:04d}", "name": cfg.name, "state": "queued", "config": cfg.to_dict(), "sweep": sweep,
               "output_dir": None, "lora": None, "step": 0, "total": 0, "error": None,
               "added": time.time(), "started": None, "finished": None}
        return self.save(job)

    def cancel(self, job_id: str) -> Dict[str, Any]:
        """A queued run is taken off; a running one stops after its current step (and keeps its state)."""
        job = self.get(job_id)
        if job["state"] in ("done", "failed", "cancelled"):
            raise ConfigError(f"Run {job['id']} ({job['name']}) is {job['state']} already: there is nothing to cancel.")
        if job["state"] == "running" and _lock_owner(self.folder) is not None:
            # a file of its own: the runner rewrites the run's file with its progress, and would drop a flag in it
            atomic_write_text(self._cancel_file(job), "")
            return dict(job, cancel=True)
        return self.save(job, state="cancelled", finished=time.time())

    def cancel_requested(self, job: Dict[str, Any]) -> bool:
        return self._cancel_file(job).exists()

    def _cancel_file(self, job: Dict[str, Any]) -> Path:
        return self.folder / f"{job['id']}.cancel"

    def next_job(self) -> Optional[Dict[str, Any]]:
        """An interrupted run first (it resumes), then the first queued one."""
        jobs = self.jobs()
        for states in (INTERRUPTED, ("queued",)):
            for job in jobs:
                if job["state"] in states:
                    return job
        return None

    # -- running ------------------------------------------------------------------------------
    def run(self, train: Callable[..., Any], say: Callable[[str], None] = print,
            only: Optional[List[str]] = None) -> List[Dict[str, Any]]:
        """Run the queue until it is empty (or only the ids `only`), one run at a time; returns the runs it ran.

        `train(cfg, callbacks, resume)` trains one run the front end's way (the CLI's console, the tab's job), with
        `callbacks` (the queue's: progress into the run's file, cancel) beside its own; `say` takes the queue's
        own lines. A run
        stopped by its front end (Ctrl-C, the tab's Stop) ends the queue here: the next `run` resumes it first.
        """
        with _runner_lock(self.folder):
            ran = []
            while True:
                job = self.next_job() if only is None else next(
                    (j for j in self.jobs() if j["id"] in only and j["state"] in ("queued", *INTERRUPTED)), None)
                if job is None:
                    return ran
                ran.append(self._run_one(job, train, say))
                if ran[-1]["state"] == "stopped":
                    return ran

    def _run_one(self, job: Dict[str, Any], train: Callable[..., Any], say: Callable[[str], None]) -> Dict[str, Any]:
        from ..training.checkpoints import fresh_output_dir

        cfg = config_from_dict(job["config"])
        resume = None
        if job["state"] in INTERRUPTED and job["output_dir"] and _has_state(Path(job["output_dir"])):
            cfg, resume = cfg.replace(output_dir=job["output_dir"]), job["output_dir"]
            say(f"queue: resuming run {job['id']} ({job['name']}) in {resume}")
        else:  # the folder is fixed now, so that a crash knows where to resume
            cfg = fresh_output_dir(cfg, _Say(say))
            say(f"queue: run {job['id']} ({job['name']}) → {cfg.output_dir}")
        self._cancel_file(job).unlink(missing_ok=True)  # a cancel meant for an earlier session of this run
        self.save(job, state="running", output_dir=cfg.output_dir, started=job["started"] or time.time(), error=None)
        progress = _JobProgress(self, job)
        try:
            result = train(cfg, progress, resume)
        except LoraTrainerError as err:  # the user can fix it: said on the run, the queue goes on
            say(f"queue: run {job['id']} ({job['name']}) failed: {err}")
            return self.save(job, state="failed", error=str(err), finished=time.time())
        except Exception as err:
            self.save(job, state="failed", error=f"{type(err).__name__}: {err}", finished=time.time())
            raise
        self._cancel_file(job).unlink(missing_ok=True)
        if result.stopped:
            state = "cancelled" if progress.cancelled else "stopped"
            return self.save(job, state=state, output_dir=str(result.output_dir or cfg.output_dir), step=result.steps,
                             finished=time.time() if state == "cancelled" else None)
        return self.save(job, state="done", output_dir=str(result.output_dir or cfg.output_dir),
                         lora=str(result.lora_path), step=result.steps, finished=time.time())


class _Say(Callbacks):
    def __init__(self, say: Callable[[str], None]) -> None:
        self.on_status = say  # type: ignore[method-assign]


class _JobProgress(Callbacks):
    """Writes the run's step into its queue file (at most once a second) and stops it when it is cancelled."""
    every = 1.0  # seconds between two writes, and between two looks for a cancel

    def __init__(self, queue: Queue, job: Dict[str, Any]) -> None:
        self.queue, self.job = queue, job
        self.cancelled = False
        self._written = self._checked = 0.0

    def on_progress(self, step: int, total: int) -> None:
        now = time.monotonic()
        if now - self._written >= self.every or step >= total:
            self._written = now
            self.queue.save(self.job, step=step, total=total)

    def should_stop(self) -> bool:
        now = time.monotonic()
        if not self.cancelled and now - self._checked >= self.every:
            self._checked = now
            self.cancelled = self.queue.cancel_requested(self.job)
        return self.cancelled


def _has_state(output_dir: Path) -> bool:
    state = output_dir / "state"
    return state.is_dir() and any(state.iterdir())


class _runner_lock:
    """`runner.lock` holds the runner's pid; a second runner is refused in one line, a dead one's lock taken."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "runner.lock"

    def __enter__(self) -> None:
        if not _IN_PROCESS.acquire(blocking=False):
            raise ConfigError("This process is running the queue already: its next run starts when this one ends.")
        owner = _lock_owner(self.path.parent)
        if owner is not None and owner != os.getpid():
            _IN_PROCESS.release()
            raise ConfigError(f"The queue in {self.path.parent} is being run by process {owner}: it takes the new "
                              "runs in order; stop it first to run the queue here.")
        atomic_write_text(self.path, str(os.getpid()))

    def __exit__(self, *exc: Any) -> None:
        self.path.unlink(missing_ok=True)
        _IN_PROCESS.release()


def _lock_owner(folder: Path) -> Optional[int]:
    """The pid running the queue in `folder`, or None (no lock, or its process is gone)."""
    try:
        pid = int((folder / "runner.lock").read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid
