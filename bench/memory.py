"""The memory plan against measured peaks, and what base_precision saves, side by side in one run.

For each architecture (random weights in the real SD1.5 / SDXL shapes, read from a single-file
checkpoint as users have them; `flux`: Flux.1 schnell at full width with one double and one single
block, in its four released files, as bench/train_step.py --family flux trains it), resolution and base_precision, one process first asks
`plan_memory` for its prediction (counting only), then runs `train(cfg)` for a few steps and
reports its own peak: on the CPU its resident set (VmHWM), on CUDA torch.cuda.max_memory_allocated.

    python bench/memory.py                                    # SD1.5 and SDXL, 256 and 512 px, every precision
    python bench/memory.py --families sd1 --resolutions 256 --batch 2
    python bench/memory.py --families flux --resolutions 256,512 --precisions fp32,bf16,fp8
    python bench/memory.py --device cuda --families sdxl --resolutions 1024 --precisions bf16 --low-vram
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default="sd1,sdxl")
    p.add_argument("--resolutions", default="256,512")
    p.add_argument("--precisions", default="fp32,fp16,bf16,fp8")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--checkpointing", action="store_true", help="gradient_checkpointing: true")
    p.add_argument("--low-vram", action="store_true", help="the tab's Low VRAM preset (checkpointing, fp8, batch 1)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(spec: dict) -> dict:
    import torch

    from lora_trainer.config import TrainConfig
    from lora_trainer.training.plan import plan_memory
    from lora_trainer.training.loop import train
    from train_step import peak_rss_mb

    from lora_trainer.ui.session import LOW_VRAM

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = spec["device"]
    files = json.loads(Path(spec["checkpoint"]).read_text()) if spec["checkpoint"].endswith(".json") else \
        {"base_model": spec["checkpoint"]}
    if "t5_tokenizer" in files:
        files["target_modules"] = ["attn", "ff"]  # Flux: the double and single blocks' attention and MLP
    cfg = TrainConfig(train_data_dir=spec["data"], output_dir=tempfile.mkdtemp(prefix="bench-memory-"), **files,
                      resolution=spec["resolution"], min_bucket_reso=64,
                      batch_size=spec["batch"], max_train_steps=spec["steps"], lora_rank=spec["rank"],
                      lora_alpha=spec["rank"], base_precision=spec["precision"], device=device,
                      mixed_precision="bf16" if device == "cuda" else "no",
                      gradient_checkpointing=spec["checkpointing"], seed=0)
    if spec["low_vram"]:
        cfg = cfg.replace(**{k: v for k, v in LOW_VRAM.items() if k != "gradient_accumulation_steps"})
    plan = plan_memory(cfg, device)
    train(cfg)
    measured = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mb()
    phase = next(k for k in plan.parts if k.startswith("largest phase"))
    return {"predicted_mb": plan.peak_bytes / 2**20, "measured_mb": measured, "phase": phase.split(": ")[1]}


def main(argv=None) -> None:
    args = _args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    from lora_trainer.cli.demo_data import make_demo_images
    from train_step import random_checkpoint, random_flux_files

    rows = []
    for family in args.families.split(","):
        checkpoint = random_flux_files() if family == "flux" else random_checkpoint(family)
        for resolution in map(int, args.resolutions.split(",")):
            data = make_demo_images(Path(tempfile.mkdtemp(prefix="bench-data-")), n=4, size=resolution * 3 // 2)
            for precision in args.precisions.split(","):
                spec = {"data": str(data), "checkpoint": str(checkpoint), "resolution": resolution,
                        "batch": args.batch, "steps": args.steps, "rank": args.rank,
                        "precision": "fp32" if precision == "fp32" else precision,
                        "checkpointing": args.checkpointing, "threads": args.threads, "device": args.device,
                        "low_vram": args.low_vram}
                done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                                      text=True, check=False)
                if done.returncode != 0:
                    sys.exit(f"{family} {resolution} px {precision} failed:\n{done.stderr[-3000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append((family, resolution, precision, result))
                print(f"  {family} {resolution} px {precision}: {result}", file=sys.stderr, flush=True)
    what = "torch.cuda.max_memory_allocated" if args.device == "cuda" else "peak resident set of the process (VmHWM)"
    print(f"\n{args.device}, batch {args.batch}, rank {args.rank}, {args.steps} steps, gradient_checkpointing "
          f"{args.checkpointing}, low VRAM preset {args.low_vram}; {what}\n")
    print("| architecture | px | base_precision | predicted MiB | measured MiB | error | peak phase | vs fp32 |")
    print("| --- | ---: | --- | ---: | ---: | ---: | --- | ---: |")
    fp32 = {(f, r): res["measured_mb"] for f, r, p, res in rows if p == "fp32"}
    for family, resolution, precision, r in rows:
        error = (r["predicted_mb"] - r["measured_mb"]) / r["measured_mb"]
        ratio = r["measured_mb"] / fp32[(family, resolution)] if (family, resolution) in fp32 else float("nan")
        print(f"| {family} | {resolution} | {precision} | {r['predicted_mb']:.0f} | {r['measured_mb']:.0f} | "
              f"{error:+.1%} | {r['phase']} | {ratio:.2f}× |")


if __name__ == "__main__":
    main()
