"""Run a queue in its own process and SIGKILL itself at a given step of a given run (no cleanup: a power cut).

Used by test_experiments.py: `python queue_worker.py ROOT [--kill-run ID --kill-after STEP]`.
"""

import os
import signal
import sys

import torch

from lora_trainer.callbacks import Callbacks, MultiCallbacks
from lora_trainer.experiments.queue import Queue
from lora_trainer.training.loop import train


class KillAt(Callbacks):
    def __init__(self, step):
        self.step = step

    def on_loss(self, step, loss, lr):
        if step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main(argv):
    root = argv[0]
    kill_run = argv[argv.index("--kill-run") + 1] if "--kill-run" in argv else None
    kill_after = int(argv[argv.index("--kill-after") + 1]) if "--kill-after" in argv else None
    torch.set_num_threads(1)
    queue = Queue(root)

    def run(cfg, callbacks, resume):
        running = next(j for j in queue.jobs() if j["state"] == "running")
        killer = KillAt(kill_after) if running["id"] == kill_run else None
        return train(cfg, MultiCallbacks(callbacks, killer), resume=resume)

    for job in queue.run(run, say=lambda line: print(line, file=sys.stderr)):
        print(job["id"], job["state"])


if __name__ == "__main__":
    main(sys.argv[1:])
