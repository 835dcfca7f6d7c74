"""Seconds per step, process start to last step, and peak memory: our training vs a bare diffusers + peft loop.

Both loops start from the same single-file checkpoint (random weights in the real SD1.5 or SDXL
architecture, written once, in fp16 as most downloads are) and train the same LoRA on the
attention projections, on the same images, batch size and precision, with latents and text
embeddings computed once (the bare loop keeps them in memory; ours uses its caches). The bare
loop reads the file the way diffusers' `from_single_file` does (`safetensors.torch.load_file`,
then diffusers' converters); ours is `train(cfg)` with `base_model` pointing at the file, exactly
what the CLI runs. Each loop runs in its own process, so "start → last step" includes Python's
and torch's start-up and peak memory is that process's own.

    python bench/train_step.py --threads 1 --rank 8  # CPU: 64 px, fp32
    python bench/train_step.py --device cuda         # GPU: 512 px, bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--resolution", type=int, default=None, help="default: 64 on CPU, 512 on CUDA")
    p.add_argument("--family", default="sd1", choices=["sd1", "sdxl"])
    p.add_argument("--variant", default="base", help="shipped architecture: base (real size) or tiny")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--worker", choices=["ours", "bare"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _precision(args) -> str:
    return "bf16" if args.device == "cuda" else "no"


def random_checkpoint(family: str, variant: str = "base") -> Path:
    """A single-file checkpoint of random weights (seed 0, fp16) in the shipped architecture, written once by a
    process of its own (so that no benchmark process inherits its memory) and kept in the temp folder."""
    path = Path(tempfile.gettempdir()) / "lora-trainer-bench" / f"random-{family}-{variant}-fp16.safetensors"
    if not path.is_file():
        code = ("import sys, torch; sys.path[:0] = [{root!r}, {tests!r}]; from ldm_layout import save_ldm_file; "
                "from lora_trainer.model.tiny import build_random_components; "
                "c = build_random_components({family!r}, {variant!r}, 0).to(dtype=torch.float16); "  # SDXL: 7 GB, not 14
                "save_ldm_file(c, __import__('pathlib').Path({path!r}))")
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-c", code.format(root=str(ROOT), tests=str(ROOT / "tests"), family=family,
                                                           variant=variant, path=str(path))], check=True)
    return path


def _bare_components(args):
    """The model as diffusers' from_single_file builds it: the whole file in memory, then converted."""
    from safetensors.torch import load_file

    from lora_trainer.model import load_components

    return load_components(load_file(args.checkpoint))  # a plain dict: copied, as diffusers copies


def _peak_memory_mb(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def peak_rss_mb() -> float:
    """This process's own peak resident set (VmHWM). Not ru_maxrss: Linux carries that over from the parent
    across fork and exec, so a worker started by a large parent would report the parent's peak."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def run_ours(args) -> dict:
    from lora_trainer.callbacks import Callbacks
    from lora_trainer.config import TrainConfig
    from lora_trainer.training.loop import train

    stamps = []

    class Clock(Callbacks):
        def on_loss(self, step, loss, lr):
            if args.device == "cuda":
                import torch

                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    out = tempfile.mkdtemp(prefix="bench-ours-")
    cfg = TrainConfig(train_data_dir=args.data, output_dir=out, base_model=args.checkpoint, resolution=args.resolution,
                      min_bucket_reso=min(256, args.resolution), lora_rank=args.rank, lora_alpha=args.rank,
                      target_modules=TARGETS, batch_size=args.batch_size, max_train_steps=args.warmup + args.steps,
                      mixed_precision=_precision(args), device=args.device, cache_latents=True,
                      cache_text_embeddings=True, seed=0)
    train(cfg, Clock())
    return _result(args, stamps)


def _result(args, stamps) -> dict:
    deltas = [b - a for a, b in zip(stamps[args.warmup - 1:], stamps[args.warmup:])]
    return {"s_per_step": statistics.median(deltas), "peak_mb": _peak_memory_mb(args.device),
            "last_step_at": time.time() - (time.perf_counter() - stamps[-1])}


def run_bare(args) -> dict:
    """The reference: the diffusers LoRA example's inner loop, nothing else."""
    import torch
    import torch.nn.functional as F
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig

    from lora_trainer.config import TrainConfig
    from lora_trainer.data.dataset import epoch_batches, prepare_image, scan_images
    from lora_trainer.data.latents import encode_pixels
    from lora_trainer.model import encode_text

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if _precision(args) == "bf16" else torch.float32
    comps = _bare_components(args)
    cfg = TrainConfig(train_data_dir=args.data, resolution=args.resolution, min_bucket_reso=min(256, args.resolution),
                      batch_size=args.batch_size)
    records, _ = scan_images(cfg)
    batches = epoch_batches(records, cfg, 0, 0)
    unet, vae = comps.unet, comps.vae.to(device)
    with torch.no_grad():  # latents and text embeddings once, kept in memory
        latents = [encode_pixels(vae, torch.stack([prepare_image(r, b).pixels for r, b in batch])) for batch in batches]
        texts = [encode_text(comps, [r.caption for r, _ in batch]) for batch in batches]
    vae.to("cpu")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for n, p in unet.named_parameters():
        if "lora_" not in n:
            p.data = p.data.to(dtype)
    unet.to(device).train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=device.type == "cuda")
    sched = get_scheduler("constant", opt)
    noise_sched = comps.noise_scheduler
    stamps = []
    for step in range(args.warmup + args.steps):
        i = step % len(batches)
        x0 = latents[i].to(device, torch.float32)
        hidden = texts[i][0].to(device)
        noise = torch.randn_like(x0)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (x0.shape[0],), device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            pred = unet(noise_sched.add_noise(x0, noise, t), t, encoder_hidden_states=hidden).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
    return _result(args, stamps)


def main(argv=None) -> None:
    args = _args(argv)
    args.resolution = args.resolution or (512 if args.device == "cuda" else 64)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(run_ours(args) if args.worker == "ours" else run_bare(args)))
        return
    from lora_trainer.cli.demo_data import make_demo_images

    folder = Path(tempfile.mkdtemp(prefix="bench-data-"))
    data = make_demo_images(folder, n=8, size=args.resolution * 3 // 2)
    checkpoint = random_checkpoint(args.family, args.variant)
    results = {}
    for worker in ("bare", "ours"):
        cmd = [sys.executable, __file__, *(argv or sys.argv[1:]), "--worker", worker, "--data", str(data),
               "--resolution", str(args.resolution), "--checkpoint", str(checkpoint)]
        started = time.time()
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"{worker} loop failed:\n{done.stderr[-3000:]}")
        results[worker] = json.loads(done.stdout.strip().splitlines()[-1])
        results[worker]["start_to_last"] = results[worker]["last_step_at"] - started
    bare, ours = results["bare"], results["ours"]
    mem = "peak GPU MiB" if args.device == "cuda" else "peak RSS MiB"
    print(f"\n{args.family} {args.variant} architecture, {args.resolution} px, batch {args.batch_size}, rank {args.rank}, "
          f"{_precision(args)}, {args.device}, median of {args.steps} steps\n")
    print(f"| loop | s/step | start → last step, s | {mem} |")
    print("| --- | ---: | ---: | ---: |")
    for name, r in (("bare diffusers + peft", bare), ("lora_trainer train(cfg)", ours)):
        print(f"| {name} | {r['s_per_step']:.4f} | {r['start_to_last']:.1f} | {r['peak_mb']:.0f} |")
    print(f"| ratio (ours / bare) | {ours['s_per_step'] / bare['s_per_step']:.3f} | "
          f"{ours['start_to_last'] / bare['start_to_last']:.3f} | {ours['peak_mb'] / bare['peak_mb']:.3f} |")


if __name__ == "__main__":
    main()
