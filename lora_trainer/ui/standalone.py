"""`python -m lora_trainer ui`: the Train LoRA tab without a WebUI (base model from a path, grid by our sampler)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, List, Optional, Tuple

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

    def train(self, cfg: Any, callbacks: Any, task_id: str = "", resume: Optional[str] = None) -> Any:
        from ..training.loop import train

        comps = copy.deepcopy(self.components) if self.components is not None else None
        return train(cfg, callbacks=callbacks, host=self.host(), components=comps, resume=resume)

    def test_pictures(self, cfg: Any, lora_path: Path, prompt: str, seed: int) -> Tuple[List[Any], List[str]]:
        import torch

        from ..adapters.export import load_lora_file
        from ..training.memory import release
        from ..model import load_components
        from ..evaluate.sample import render_images
        from ..evaluate.score import deterministic

        comps = copy.deepcopy(self.components) if self.components is not None else load_components(cfg.base_model)
        load_lora_file(comps, lora_path)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            with deterministic():  # the same pictures, so the same scores, for the same seed
                [row] = render_images(comps, [prompt], list(TEST_STRENGTHS), seed=seed, steps=self.sample_steps,
                                      device=device, size=self.sample_size or cfg.resolution)
        finally:
            del comps
            release()  # the copy the grid was rendered with, handed back before the scorer loads
        return row, [""] * len(row)  # no txt2img tab to send parameters to

    def test_grid_file(self, lora_path: Path) -> Optional[Path]:
        return Path(lora_path).with_suffix(".grid.png")


def serve(host: str = "127.0.0.1", port: int = 7861, output_root: str = "output", base_model: str = "",
          **launch_kwargs: Any) -> Any:
    """Build and launch the standalone UI (blocks until closed unless prevent_thread_lock=True)."""
    blocks = build_blocks(StandaloneBackend(output_root, base_model))
    blocks.queue()
    return blocks.launch(server_name=host, server_port=port, **launch_kwargs)
