"""A standalone backend that trains the tiny SD1 model in a few CPU steps (the real train(), small settings)."""

from __future__ import annotations

import copy

from lora_trainer.ui import StandaloneBackend

TINY = dict(resolution=64, min_bucket_reso=64, max_bucket_reso=128, lora_rank=4, lora_alpha=4, batch_size=2,
            learning_rate=1e-3, max_train_steps=3, device="cpu", sample_steps=2, seed=0)


class TinyBackend(StandaloneBackend):
    overrides: dict = {}  # over TINY (the queue's tests: more steps, a saved state)

    def train(self, cfg, callbacks, task_id="", resume=None):
        from lora_trainer.training.loop import train

        cfg = cfg.replace(**{**TINY, **self.overrides}, sample_prompts=[cfg.trigger_word or "a house"],
                          sample_strengths=[0.0, 1.0])
        return train(cfg, callbacks=callbacks, components=copy.deepcopy(self.components), resume=resume)
