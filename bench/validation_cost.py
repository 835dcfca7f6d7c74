"""What validation costs: seconds of validation passes against seconds of training.

Trains the real SD1.5 architecture (random weights, `build_random_components("sd1", "base")`; no
download) with `validation_split` on, at the default validation settings (4 timesteps, batch
size 1), and times every validation pass and every training step separately. Then it projects
the measured costs onto typical runs: a pass costs (validation images × validation_timesteps)
forward passes, a training step one forward and one backward, and a run validates at every
save_steps checkpoint and once at the end.

    python bench/validation_cost.py                          # CPU, 64 px: a few minutes
    python bench/validation_cost.py --device cuda --resolution 512
    python bench/validation_cost.py --variant tiny --steps 8  # seconds; the tiny model's ratio is not representative
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (what, images, validation_split, steps, save_steps, batch_size); validation_dir rows give the split as None.
TYPICAL = [
    ("20 images, split 0.1, save 500 of 1000", 20, 0.1, 1000, 500, 1),
    ("50 images, split 0.1, save 500 of 3000", 50, 0.1, 3000, 500, 1),
    ("50 images, split 0.1, save 100 of 1000", 50, 0.1, 1000, 100, 1),
    ("seed YAML: 30 images, batch 4, save 100", 30, 0.1, 113, 100, 4),
    ("300 images, split 0.1 (capped), save 500 of 3000", 300, 0.1, 3000, 500, 1),
    ("validation_dir of 20+, save 100 of 1000", 20, None, 1000, 100, 1),
]


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--variant", default="base", help="shipped SD1 architecture: base (real size) or tiny")
    p.add_argument("--resolution", type=int, default=None, help="default: 64 on CPU, 512 on CUDA")
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--split", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--save-steps", type=int, default=6)
    p.add_argument("--timesteps", type=int, default=4, help="validation_timesteps")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return p.parse_args(argv)


def measure(args) -> dict:
    """Train once with validation; return the median step time, the pass times and the images per pass."""
    import torch

    from lora_trainer.callbacks import Callbacks
    from lora_trainer.config import TrainConfig
    from lora_trainer.cli.demo_data import make_demo_images
    from lora_trainer.model.tiny import build_random_components
    from lora_trainer.training.loop import train
    from lora_trainer.training.validation import Validator

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    passes, stamps, outside = [], [], []
    real_measure = Validator.measure

    def timed_measure(self):
        sync()
        start = time.perf_counter()
        value = real_measure(self)
        sync()
        passes.append((time.perf_counter() - start, len(self.items)))
        return value

    Validator.measure = timed_measure

    class Clock(Callbacks):
        def on_loss(self, step, loss, lr):
            sync()
            stamps.append(time.perf_counter())

        def on_saved(self, path, final):  # checkpoints and passes sit between two steps: not step time
            outside.append(len(stamps))

    tmp = Path(tempfile.mkdtemp(prefix="bench-validation-"))
    data = make_demo_images(tmp / "data", n=args.images, size=args.resolution * 3 // 2)
    cfg = TrainConfig(train_data_dir=str(data), output_dir=str(tmp / "out"), resolution=args.resolution,
                      min_bucket_reso=min(256, args.resolution), lora_rank=16, lora_alpha=16,
                      target_modules=["q_proj", "k_proj", "v_proj", "out_proj"], batch_size=1,
                      max_train_steps=args.steps, save_steps=args.save_steps, validation_split=args.split,
                      validation_timesteps=args.timesteps, mixed_precision="bf16" if args.device == "cuda" else "no",
                      device=args.device, seed=0)
    components = build_random_components("sd1", args.variant, seed=0)
    train(cfg, Clock(), components=components)
    Validator.measure = real_measure
    skip = set(outside) | {1}  # the interval after a save holds the save and the pass; the first warms up
    steps = [b - a for i, (a, b) in enumerate(zip(stamps, stamps[1:]), 1) if i not in skip]
    return {"step_s": statistics.median(steps), "passes": passes, "steps": args.steps}


def projected_share(step_s: float, forward_s: float, images: int, split, steps: int, save_steps: int,
                    batch: int, timesteps: int) -> tuple:
    """(validation images, validation s, training s, validation / training) of a run, from measured per-step and per-forward costs.

    A step's cost grows with the batch roughly linearly; a pass's with images × timesteps (chunks of batch_size).
    """
    from lora_trainer.config import MAX_VALIDATION_IMAGES

    held = images if split is None else int(images * split + 0.5)
    held = min(MAX_VALIDATION_IMAGES, max(1, held))
    passes = (steps - 1) // save_steps + 1
    validation = passes * held * timesteps * forward_s
    training = steps * batch * step_s
    return held, validation, training, validation / training


def main(argv=None) -> None:
    args = _args(argv)
    args.resolution = args.resolution or (512 if args.device == "cuda" else 64)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = measure(args)
    step_s = result["step_s"]
    pass_s = statistics.median(s for s, _ in result["passes"])
    images = result["passes"][0][1]
    forward_s = pass_s / (images * args.timesteps)
    total_val = sum(s for s, _ in result["passes"])
    total_train = step_s * args.steps
    print(f"SD1 {args.variant} architecture, {args.device}, {args.resolution} px, batch 1, rank 16, "
          f"validation_timesteps {args.timesteps}")
    print(f"measured: training step {step_s:.3f} s, validation pass {pass_s:.3f} s for {images} image(s) "
          f"({forward_s:.3f} s per forward; a step costs {step_s / forward_s:.2f} forwards)")
    print(f"this run: {args.steps} steps, save_steps {args.save_steps}: training {total_train:.1f} s, "
          f"validation {total_val:.1f} s ({len(result['passes'])} passes), "
          f"validation = {100 * total_val / total_train:.1f} % of the training time\n")
    rows = [("run", "val images", "training s", "validation s", "validation / training")]
    for what, n, split, steps, save, batch in TYPICAL:
        held, val, tr, share = projected_share(step_s, forward_s, n, split, steps, save, batch, args.timesteps)
        rows.append((what, str(held), f"{tr:.0f}", f"{val:.0f}", f"{100 * share:.1f} %"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
        if i == 0:
            print("| " + " | ".join("-" * w for w in widths) + " |")


if __name__ == "__main__":
    main()
