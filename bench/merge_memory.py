"""Peak memory of `merge --base`: a random real-size checkpoint (SDXL by default) with a random LoRA baked in.

The merge streams the base tensor by tensor, so its peak resident set should stay under the base file's size
plus 1 GB. The checkpoint comes from train_step.random_checkpoint (written once, kept in the temp folder); the
LoRA (every attention, projection and feed-forward layer of the UNet and the text encoders, at --rank) is made
here from the base's own key names. The merge runs in a process of its own and reports its VmHWM.

    python bench/merge_memory.py --family sdxl --rank 32
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

TARGETS = ("to_q", "to_k", "to_v", "to_out_0", "proj_in", "proj_out", "ff_net_0_proj", "ff_net_2",
           "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def random_lora(checkpoint: Path, path: Path, rank: int) -> Path:
    import torch
    from safetensors.torch import save_file

    from lora_trainer.adapters.merge import module_map
    from lora_trainer.model.checkpoint_file import CheckpointFile
    from lora_trainer.model.detect import detect_family
    from lora_trainer.model.shipped import load_configs
    from lora_trainer.model.single_file import select_variant

    base = CheckpointFile(checkpoint)
    family = detect_family(list(base))
    where = module_map(list(base), family, load_configs(family, select_variant(family, base)))
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for module, (key, part) in where.items():
        if not module.endswith(TARGETS):
            continue
        shape = base.shape(key)
        rows = shape[0] // part[1] if part else shape[0]
        cols = torch.Size(shape[1:]).numel()
        tensors[f"{module}.lora_down.weight"] = (torch.randn(rank, cols, generator=g) * 0.01).half()
        tensors[f"{module}.lora_up.weight"] = (torch.randn(rows, rank, generator=g) * 0.01).half()
        tensors[f"{module}.alpha"] = torch.tensor(float(rank)).half()
    save_file(tensors, str(path), metadata={"ss_base_model_version": {"sdxl": "sdxl_base_v1-0", "sd2": "sd_v2"}
                                            .get(family, "sd_v1")})
    return path


def child(args) -> None:
    from train_step import peak_rss_mb

    from lora_trainer.adapters.merge import merge_into_checkpoint

    start = time.perf_counter()
    merge_into_checkpoint(Path(args.checkpoint), [(Path(args.lora), 0.8)], Path(args.output))
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="sdxl", choices=["sd1", "sd2", "sdxl"])
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--lora", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    from train_step import random_checkpoint

    checkpoint = random_checkpoint(args.family)
    with tempfile.TemporaryDirectory(dir=checkpoint.parent) as folder:
        lora = random_lora(checkpoint, Path(folder) / "lora.safetensors", args.rank)
        out = Path(folder) / "merged.safetensors"
        run = subprocess.run([sys.executable, __file__, "--child", "--checkpoint", str(checkpoint), "--lora", str(lora),
                              "--output", str(out)], check=True, capture_output=True, text=True)
        result = json.loads(run.stdout.strip().splitlines()[-1])
        base_mb, lora_mb = checkpoint.stat().st_size / 2**20, lora.stat().st_size / 2**20
    print(f"{args.family}: base {base_mb:,.0f} MB, LoRA rank {args.rank} {lora_mb:,.0f} MB, merge "
          f"{result['seconds']:.0f} s, peak RSS {result['peak_rss_mb']:,.0f} MB "
          f"(limit base + 1 GB = {base_mb + 1024:,.0f} MB)")


if __name__ == "__main__":
    main()
