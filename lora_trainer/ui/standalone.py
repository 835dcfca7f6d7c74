"""`python -m lora_trainer ui`: the Train LoRA tab without a WebUI (base model from a path, grid by our sampler)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional, Tuple

from .blocks import Backend, build_blocks
from .session import TEST_STRENGTHS


class StandaloneBackend(Backend):
    """Trains from a checkpoint path; `components` (tests: a tiny model) replaces loading one."""

    title = "Train LoRA (lora-scripts)"

    def __init__(self, output_root: str | Path = "output", base_model: str = "", components: Any = None,
                 sample_steps: int = 20, sample_size: Optional[int] = None) -> None:
        self._root = Path(output_root)
        self._base = base_model
        self.components = components
        self.sample_steps = sample_steps
        self.sample_size = sample_size

    def default_base_model(self) -> str:
        return self._base

    def output_root(self) -> Path:
        return self._root

    def train(self, cfg: Any, callbacks: Any, task_id: str = "") -> Any:
        from ..train import train

        comps = copy.deepcopy(self.components) if self.components is not None else None
        return train(cfg, callbacks=callbacks, host=self.host(), components=comps)

    def test_grid(self, cfg: Any, lora_path: Path, prompt: str, seed: int, task_id: str = "") -> Tuple[Any, str]:
        import torch

        from ..lora import load_lora_file
        from ..memory import release
        from ..model import load_components
        from ..sample import render_grid

        comps = copy.deepcopy(self.components) if self.components is not None else load_components(cfg.base_model)
        load_lora_file(comps, lora_path)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        prompt = prompt or cfg.trigger_word or "a picture"
        out = Path(lora_path).with_suffix(".grid.png")
        try:
            grid = render_grid(comps, [prompt], list(TEST_STRENGTHS), out, seed=seed, steps=self.sample_steps,
                               device=device, size=self.sample_size or cfg.resolution)
        finally:
            del comps
            release()  # the copy the grid was rendered with, handed back to the system
        return grid, ""  # no txt2img tab to send parameters to


def serve(host: str = "127.0.0.1", port: int = 7861, output_root: str = "output", base_model: str = "",
          **launch_kwargs: Any) -> Any:
    """Build and launch the standalone UI (blocks until closed unless prevent_thread_lock=True)."""
    blocks = build_blocks(StandaloneBackend(output_root, base_model))
    blocks.queue()
    return blocks.launch(server_name=host, server_port=port, **launch_kwargs)
