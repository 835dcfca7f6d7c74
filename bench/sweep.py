"""A 2×2 sweep against the same four runs trained one by one: wall time and VAE encodes, side by side.

Three ways to train the same four runs (lora_rank 4, 8 × learning_rate 1e-4, 1e-3) from one single-file checkpoint
on the same images, each timed from its command's start to its end, every one a fresh process:

- `train ×4`: four `python -m lora_trainer train` commands, one after the other (each its own cache);
- `queue ×4`: the four runs added to a queue and run by one `queue run` (one process, each run its own cache);
- `sweep 2×2`: `python -m lora_trainer sweep --grid lora_rank=4,8 --grid learning_rate=1e-4,1e-3 --no-grid`
  (one process, one cache for all four).

"encodes" counts the latent cache's files the runs wrote (one per image, bucket, crop and flip: each one VAE encode).

    python bench/sweep.py                     # the tiny test architecture at 64 px (CPU, about a minute a row)
    python bench/sweep.py --variant base --resolution 256 --images 16 --steps 4   # SD1.5's real size
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from train_step import random_checkpoint  # noqa: E402  (bench/: the one random checkpoint writer)

GRID = {"lora_rank": ["4", "8"], "learning_rate": ["1e-4", "1e-3"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="tiny", help="shipped SD1 architecture: tiny (tests) or base (real size)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    args = p.parse_args(argv)

    import yaml

    from lora_trainer.cli.demo_data import make_demo_images

    work = Path(tempfile.mkdtemp(prefix="lora-trainer-sweep-bench-"))
    data = make_demo_images(work / "data", n=args.images, size=max(96, args.resolution))
    config = work / "style.yaml"
    values = dict(train_data_dir=str(data), base_model=str(random_checkpoint("sd1", args.variant)),
                  resolution=args.resolution, min_bucket_reso=64, max_bucket_reso=max(128, args.resolution * 2),
                  batch_size=1, max_train_steps=args.steps, save_steps=0, device="cpu", seed=0,
                  validation_split=0.25, validation_timesteps=2, output_name="style")
    combos = [(r, lr) for r in GRID["lora_rank"] for lr in GRID["learning_rate"]]
    rows = []

    def timed(label, commands, caches):
        start = time.perf_counter()
        for command in commands:
            subprocess.run([sys.executable, "-m", "lora_trainer", *command], cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        seconds = time.perf_counter() - start
        encodes = sum(len(list(Path(c).glob("latents/*.safetensors"))) for c in caches)
        rows.append((label, seconds, encodes))

    # 1. four train commands
    out = work / "train"
    config.write_text(yaml.safe_dump(dict(values, output_dir=str(out))), encoding="utf-8")
    timed("train ×4", [["train", "--config", str(config), "--set", f"lora_rank={r}", "--set", f"learning_rate={lr}",
                        "--set", f"output_dir={out / f'r{r}-lr{lr}'}"] for r, lr in combos],
          [out / f"r{r}-lr{lr}" / "cache" for r, lr in combos])
    # 2. the same four runs through the queue, one process, a cache each
    out = work / "queue"
    adds = [["queue", "add", "--config", str(config), "--root", str(out), "--set", f"lora_rank={r}", "--set",
             f"learning_rate={lr}", "--set", f"output_dir={out / f'r{r}-lr{lr}'}"] for r, lr in combos]
    for command in adds:  # adding is not training: not timed
        subprocess.run([sys.executable, "-m", "lora_trainer", *command], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
    timed("queue ×4", [["queue", "run", "--root", str(out)]], [out / f"r{r}-lr{lr}" / "cache" for r, lr in combos])
    # 3. the sweep: one process, one cache
    out = work / "sweep"
    config.write_text(yaml.safe_dump(dict(values, output_dir=str(out))), encoding="utf-8")
    timed("sweep 2×2", [["sweep", "--config", str(config), "--root", str(out), "--no-grid",
                         *[x for k, v in GRID.items() for x in ("--grid", f"{k}={','.join(v)}")]]], [out / "cache"])

    base = rows[0][1]
    print(f"SD1 {args.variant} architecture, {args.resolution} px, {args.images} images (25 % validation), "
          f"{args.steps} steps per run, CPU, {args.threads} thread(s); {work}")
    print(f"{'how':<11} {'wall s':>8} {'VAE encodes':>12} {'vs train ×4':>12}")
    for label, seconds, encodes in rows:
        print(f"{label:<11} {seconds:8.1f} {encodes:12d} {base / seconds:11.2f}×")


if __name__ == "__main__":
    main()
