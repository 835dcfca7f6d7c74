"""`python -m lora_trainer demo`: the whole path on a tiny random model, on CPU, in seconds.

It draws a small image set, writes its metadata.csv (file_name,text), trains a rank-4 LoRA
on a tiny SD1-architecture model built from a config (no download), saves the kohya-layout
file with its metadata, and renders a strength grid. The output is meaningless as art; it
proves every stage works where it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import TrainConfig


def demo_config(output: Path, steps: int) -> TrainConfig:
    return TrainConfig(
        train_data_dir=str(output / "data"),
        trigger_word="demo_style",
        resolution=64,
        min_bucket_reso=64,
        max_bucket_reso=128,
        lora_rank=4,
        lora_alpha=8,
        batch_size=2,
        max_train_steps=steps,
        learning_rate=1e-3,
        save_steps=max(1, steps // 2),
        output_dir=str(output),
        output_name="demo_lora",
        sample_prompts=["demo_style, a red circle on a teal background"],
        sample_strengths=[0.0, 0.5, 1.0],
        sample_steps=4,
        device="cpu",
    )


def run_demo(output: Path, steps: int = 30) -> Any:
    from .console import ConsoleCallbacks, run_training
    from .demo_data import make_demo_images
    from ..model import build_tiny_components
    from ..training.checkpoints import fresh_output_dir

    # A folder holding an earlier demo keeps all of it, its images too: this demo goes to the next free -vN.
    output = Path(fresh_output_dir(demo_config(Path(output), steps), ConsoleCallbacks()).output_dir)
    make_demo_images(output / "data")
    components = build_tiny_components("sd1", seed=0)
    return run_training(demo_config(output, steps), components=components)
