"""The tab's Queue: the form's run added to `<output root>/queue` (`experiments.queue`), and that queue run in this
process one run after another, each started as Train starts one (`session.start_run`: the host's job, its model off
the GPU and back, the LoRA registered, the loss plot, the tab's Stop).

One runner per process (`RUNNER`, a thread): it starts when the tab's current run has ended and takes the runs added
meanwhile. A run stopped with Stop (or Interrupt) ends the queue there; Run queue, the next Queue or
`POST /lora_trainer/queue` starts the runner again, which resumes that run first. Cancel takes a queued run off, or
stops the running one after its step and goes on with the next.

No gradio here but `add_queue_panel`, which is handed the gradio module by `blocks.build_blocks`.
"""

from __future__ import annotations

import html
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..callbacks import Callbacks
from ..errors import ConfigError, LoraTrainerError
from ..experiments.queue import Queue
from .session import TrainSession, in_tab_words, report_page, start_run

COLUMNS = ["id", "name", "state", "progress", "report (or error)"]
PUBLIC_KEYS = ("id", "name", "state", "step", "total", "output_dir", "lora", "error")  # what the API lists of a run
POLL_SECONDS = 1.0


class QueueRunner:
    """The thread that runs the output root's queue; `ran` and `note` say what its last start did."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.thread: Optional[threading.Thread] = None
        self.ran: List[Dict[str, Any]] = []
        self.note = ""  # why the runner ended early ('' when the queue ran out or a run was stopped)

    @property
    def running(self) -> bool:
        return self.thread is not None

    def start(self, backend: Any) -> bool:
        """Run `backend`'s queue in a thread unless it runs already (it takes new runs in order); True if started."""
        with self._lock:
            if self.thread is not None:
                return False
            self.ran, self.note = [], ""
            self.thread = threading.Thread(target=self._run, args=(backend,), name="lora-trainer-queue", daemon=True)
            self.thread.start()
            return True

    def wait(self, timeout: Optional[float] = None) -> None:
        thread = self.thread
        if thread is not None:
            thread.join(timeout)

    def _run(self, backend: Any) -> None:
        while True:
            going = TrainSession.current
            if going is not None:
                going.wait()  # a run started with Train goes first
            queue = Queue(backend.output_root())  # read again: A1111's Settings may name another folder meanwhile
            try:
                ran = queue.run(lambda cfg, callbacks, resume: train_queued(backend, cfg, callbacks, resume), say=_say)
                self.ran += ran
                again = not (ran and ran[-1]["state"] == "stopped")  # a stopped run waits for the next start
            except LoraTrainerError as err:  # another process runs this queue: it takes the new run in order
                self.note, again = in_tab_words(str(err)), False
            except Exception as err:  # the run is marked failed in its file; the traceback goes to the console
                traceback.print_exc()
                self.note, again = f"{type(err).__name__}: {err}", False
            with self._lock:  # a run added after `queue.run` found none is seen here, or by the next start
                if not (again and queue.next_job() is not None):
                    self.thread = None
                    return


RUNNER = QueueRunner()


def train_queued(backend: Any, cfg: Any, callbacks: Callbacks, resume: Optional[str]) -> Any:
    """One queued run as Train runs it, once the run going now has ended; a failed run's error is raised for the
    queue to record (a LoRA saved before the failure is a done run, as in the tab)."""
    session = start_run(backend, cfg, extra=callbacks, resume=resume, wait=True)
    session.wait()
    if session.exception is not None:
        raise session.exception
    return session.result


def _say(line: str) -> None:
    print(f"[LoRA Trainer] {line}", flush=True)


def queue_run(backend: Any, cfg: Any) -> Dict[str, Any]:
    """Add `cfg` to the backend's queue and start the runner if it is idle; returns the queued run."""
    job = Queue(backend.output_root()).add(cfg)
    RUNNER.start(backend)
    return job


def public(job: Dict[str, Any]) -> Dict[str, Any]:
    return {key: job.get(key) for key in PUBLIC_KEYS}


def listing(backend: Any) -> Dict[str, Any]:
    """The queue as `GET /lora_trainer/queue` answers: every run, and whether the runner is going."""
    return {"runs": [public(job) for job in Queue(backend.output_root()).jobs()], "running": RUNNER.running}


def queue_rows(backend: Any) -> List[List[str]]:
    """The queue table: id, name, state, step/total, and the report page of a run that wrote one (else its error)."""
    rows = []
    for job in Queue(backend.output_root()).jobs():
        page = report_page(job["output_dir"]) if job["state"] in ("done", "stopped", "cancelled") else None
        progress = f"{job['step']}/{job['total']}" if job["total"] else ""
        rows.append([job["id"], job["name"], job["state"], progress, str(page or job["error"] or "")])
    return rows


def queue_table(backend: Any) -> str:
    """`queue_rows` as the tab shows them: an HTML table (gradio 4's Dataframe leaves a generator's later values
    unshown, and the table follows the queue while it runs)."""
    rows = queue_rows(backend)
    if not rows:
        return "<p>The queue is empty: Queue adds the run the form describes.</p>"
    head = "".join(f"<th>{html.escape(column)}</th>" for column in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def runner_line(backend: Any) -> str:
    """One line on the queue: what it trains now and how many wait, or how its runner ended."""
    jobs = Queue(backend.output_root()).jobs()
    waiting = sum(job["state"] == "queued" for job in jobs)
    if RUNNER.running:
        now = next((job for job in jobs if job["state"] == "running"), None)
        if now is None:
            going = TrainSession.current
            if going is not None and going.running:
                return f"Queue: {waiting} run(s) wait for the current run to end."
            return f"Queue: starting ({waiting} run(s) queued)."
        return f"Queue: run {now['id']} ({now['name']}) training" + (f"; {waiting} more queued." if waiting else ".")
    if RUNNER.note:
        return f"Queue stopped: {RUNNER.note}"
    last = RUNNER.ran[-1] if RUNNER.ran else None
    if last is not None and last["state"] == "stopped":
        return f"Queue stopped at run {last['id']} ({last['name']}): Run queue resumes it first."
    ran = ", ".join(f"{job['id']} {job['state']}" for job in RUNNER.ran)
    return f"Queue done: {ran}." if ran else "Queue: nothing to run."


def watched(backend: Any, loss_plot: Callable[[Any], Any]) -> List[Any]:
    """What the tab shows while the queue runs: status, loss plot and sample of the current run, the table."""
    session = TrainSession.current
    summary = session.summary() if session is not None else ""
    plot = loss_plot(session.callbacks if session is not None else None)
    sample = str(session.callbacks.sample) if session is not None and session.callbacks.sample else None
    status = "\n".join(line for line in (runner_line(backend), summary) if line)
    return [status, plot, sample, queue_table(backend)]


def add_queue_panel(gr: Any, backend: Any, button: Any, form: Sequence[Any], form_config: Callable[..., Any],
                    shown: Sequence[Any], loss_plot: Callable[[Any], Any]) -> List[Any]:
    """The Queue button's handlers and the queue table under it. `form` are the inputs `form_config` builds the
    run's config from (as Train does), `shown` the status, loss plot and sample Train shows; returns the events
    after which a queued run may have ended (for the host's LoRA list refresh)."""
    with gr.Accordion("Queue", open=False, elem_id="lora_trainer_queue_panel"):
        table = gr.HTML(value=lambda: queue_table(backend), elem_id="lora_trainer_queue_table")  # in running order
        with gr.Row():
            refresh = gr.Button("Refresh", elem_id="lora_trainer_queue_refresh")
            run = gr.Button("Run queue", elem_id="lora_trainer_queue_run")
            job_id = gr.Textbox(label="Run id", placeholder="0001", elem_id="lora_trainer_queue_id")
            cancel = gr.Button("Cancel run", elem_id="lora_trainer_queue_cancel")
    status = shown[0]
    started = gr.State(False)  # whether the click started or joined the runner: then the tab follows the queue

    def on_queue(*form_values):
        try:
            job = queue_run(backend, form_config(*form_values))
        except LoraTrainerError as e:
            return in_tab_words(str(e)), queue_table(backend), False
        return f"Queued run {job['id']} ({job['name']}).\n{runner_line(backend)}", queue_table(backend), True

    def on_queue_run():
        if Queue(backend.output_root()).next_job() is None:
            return "Nothing to run: every run in the queue has ended.", queue_table(backend), False
        RUNNER.start(backend)
        return runner_line(backend), queue_table(backend), True

    def on_queue_watch(follow):
        if not follow:  # Queue refused the form, or there was nothing to run: what it said stays
            yield [gr.update()] * 4
            return
        while RUNNER.running:
            time.sleep(POLL_SECONDS)
            yield watched(backend, loss_plot)
        yield watched(backend, loss_plot)

    def on_queue_refresh():
        return queue_table(backend)

    def on_queue_cancel(job_value):
        job_value = str(job_value or "").strip()
        try:
            if not job_value:
                raise ConfigError("Type the run's id (the table's first column) into Run id to cancel it.")
            job = Queue(backend.output_root()).cancel(job_value)
        except LoraTrainerError as e:
            return in_tab_words(str(e)), queue_table(backend)
        did = "stops after its current step" if job["cancel"] else "is cancelled"
        return f"Run {job['id']} ({job['name']}) {did}.", queue_table(backend)

    watching = [*shown, table]
    queued = button.click(on_queue, list(form), [status, table, started]).then(on_queue_watch, [started], watching)
    ran = run.click(on_queue_run, None, [status, table, started]).then(on_queue_watch, [started], watching)
    refresh.click(on_queue_refresh, None, [table])
    cancel.click(on_queue_cancel, [job_id], [status, table])
    return [queued, ran]
