"""Run a tiny training in its own process; optionally SIGKILL itself after a given step.

Used by test_resume.py: `python resume_worker.py DATA OUT [--kill-after N] [--resume]`.
"""

import os
import signal
import sys

import torch

from lora_trainer.callbacks import Callbacks
from lora_trainer.config import TrainConfig
from lora_trainer.model import build_tiny_components
from lora_trainer.training.loop import train


class KillAfter(Callbacks):
    def __init__(self, step):
        self.step = step

    def on_loss(self, step, loss, lr):
        if self.step is not None and step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: like a power cut


def main(argv):
    data, out = argv[0], argv[1]
    kill = int(argv[argv.index("--kill-after") + 1]) if "--kill-after" in argv else None
    torch.set_num_threads(1)
    cfg = TrainConfig(train_data_dir=data, output_dir=out, output_name="lora", resolution=64, min_bucket_reso=64,
                      max_bucket_reso=128, lora_rank=4, lora_alpha=4, batch_size=2, gradient_accumulation_steps=2,
                      max_train_steps=8, save_steps=3, learning_rate=1e-3, lora_dropout=0.1, flip_aug=True,
                      shuffle_caption=True, caption_dropout_rate=0.2, lr_scheduler="cosine", lr_warmup_steps=2,
                      noise_offset=0.05, min_snr_gamma=5, seed=7, device="cpu", save_precision="fp32")
    result = train(cfg, KillAfter(kill), components=build_tiny_components("sd1", seed=0),
                   resume=out if "--resume" in argv else None)
    print(result.lora_path)


if __name__ == "__main__":
    main(sys.argv[1:])
