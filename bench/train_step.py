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
    python bench/train_step.py --family flux --resolution 256 --steps 3 --warmup 1   # Flux.1 schnell
    python bench/train_step.py --lora-types lora,loha,lokr,dora --steps 3 --warmup 1  # adapter types, ours only

Flux: the transformer at Flux.1's full width with one double and one single block (the original file layout,
fp16), CLIP-L and T5 small but of the widths it reads; the bare loop builds it as diffusers does
(`convert_flux_transformer_checkpoint_to_diffusers`, then `FluxTransformer2DModel`) and trains with the same
rectified-flow loss on the same cached latents and embeddings.
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
    p.add_argument("--family", default="sd1", choices=["sd1", "sdxl", "flux"])
    p.add_argument("--variant", default="base", help="shipped architecture: base (real size) or tiny")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--lora-types", default="", help="compare adapter types side by side (our loop only), e.g. "
                   "lora,loha,lokr,dora")
    p.add_argument("--lora-type", default="lora", help=argparse.SUPPRESS)
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


def random_flux_files() -> Path:
    """Flux.1 schnell files at full width, one block of each kind (fp16), written once; a JSON of their paths."""
    folder = Path(tempfile.gettempdir()) / "lora-trainer-bench" / "random-flux-full-width"
    index = folder / "files.json"
    if not index.is_file():
        code = ("import sys, json, torch; sys.path[:0] = [{root!r}, {tests!r}]; from pathlib import Path; "
                "from flux_files import FULL_WIDTH, write_tiny_flux; "
                "f = write_tiny_flux(Path({folder!r}), 'schnell', width=FULL_WIDTH, dtype=torch.float16); "
                "f.pop('models'); Path({index!r}).write_text(json.dumps(f))")
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-c", code.format(root=str(ROOT), tests=str(ROOT / "tests"),
                                                           folder=str(folder), index=str(index))], check=True)
    return index


def _flux_files(args) -> dict:
    return json.loads(Path(args.checkpoint).read_text(encoding="utf-8"))


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
    files = _flux_files(args) if args.family == "flux" else {"base_model": args.checkpoint}
    cfg = TrainConfig(train_data_dir=args.data, output_dir=out, resolution=args.resolution,
                      min_bucket_reso=min(256, args.resolution), lora_rank=args.rank, lora_alpha=args.rank,
                      target_modules=TARGETS, batch_size=args.batch_size, max_train_steps=args.warmup + args.steps,
                      mixed_precision=_precision(args), device=args.device, cache_latents=True,
                      cache_text_embeddings=True, seed=0, lora_type=args.lora_type, **files)
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
        _update(F.mse_loss(pred.float(), noise.float()), params, opt, device, stamps)
        sched.step()
    return _result(args, stamps)


def _update(loss, params, opt, device, stamps) -> None:
    """The bare loops' optimizer step (clipped as ours is) and its time stamp, taken when the step is done."""
    import torch

    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    loss.item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    stamps.append(time.perf_counter())


def run_bare_flux(args) -> dict:
    """The Flux reference: diffusers' and transformers' classes loaded as their from_single_file / from_pretrained
    would, latents and embeddings once, then the rectified-flow loop of the diffusers Flux LoRA example."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers, \
        convert_ldm_vae_checkpoint
    from peft import LoraConfig
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5TokenizerFast

    from flux_files import FULL_WIDTH
    from lora_trainer.config import TrainConfig
    from lora_trainer.data.dataset import epoch_batches, prepare_image, scan_images
    from lora_trainer.model.tokenizers import load_clip_tokenizer

    torch.manual_seed(0)
    files, device = _flux_files(args), torch.device(args.device)
    dtype = torch.bfloat16 if _precision(args) == "bf16" else torch.float32
    clip_sd = load_file(files["clip_l"])
    width = clip_sd["text_model.embeddings.token_embedding.weight"].shape[1]
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=width, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=width // 64, hidden_act="quick_gelu", projection_dim=width,
                                        bos_token_id=0, eos_token_id=2))
    clip.load_state_dict({k.removeprefix("text_model."): v.float() for k, v in clip_sd.items()}, strict=False)
    t5 = T5EncoderModel(T5Config(vocab_size=60, d_model=FULL_WIDTH["t5"], d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False))
    t5.load_state_dict({k: v.float() for k, v in load_file(files["t5xxl"]).items()}, strict=False)
    vae_config = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 16, 16),
                      layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, use_quant_conv=False,
                      use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(load_file(files["vae"]), vae_config))
    clip_tok, t5_tok = load_clip_tokenizer("<|endoftext|>"), T5TokenizerFast.from_pretrained(files["t5_tokenizer"])
    cfg = TrainConfig(train_data_dir=args.data, resolution=args.resolution, min_bucket_reso=min(256, args.resolution),
                      batch_size=args.batch_size)
    records, _ = scan_images(cfg)
    batches = epoch_batches(records, cfg, 0, 0)
    with torch.no_grad():
        latents, texts = [], []
        for batch in batches:
            pixels = torch.stack([prepare_image(r, b).pixels for r, b in batch])
            z = vae.encode(pixels).latent_dist.mean
            latents.append((z - vae.config.shift_factor) * vae.config.scaling_factor)
            captions = [r.caption for r, _ in batch]
            pooled = clip(clip_tok(captions, padding="max_length", max_length=77, truncation=True,
                                   return_tensors="pt").input_ids).pooler_output
            hidden = t5(t5_tok(captions, padding="max_length", max_length=256, truncation=True,
                               return_tensors="pt").input_ids)[0]
            texts.append((hidden, pooled))
    del clip, t5, vae
    transformer = FluxTransformer2DModel(in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=FULL_WIDTH["head_dim"],
                                         num_attention_heads=FULL_WIDTH["heads"], joint_attention_dim=FULL_WIDTH["t5"],
                                         pooled_projection_dim=FULL_WIDTH["clip"], guidance_embeds=False,
                                         axes_dims_rope=FULL_WIDTH["rope"])
    transformer.load_state_dict(convert_flux_transformer_checkpoint_to_diffusers(load_file(files["base_model"])))
    transformer.requires_grad_(False)
    # the layers ours trains for q_proj, k_proj, v_proj, out_proj: both streams' attention and the single blocks'
    attention = r".*transformer_blocks\.\d+\.(attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)|proj_out)"
    transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=attention))
    for n, p in transformer.named_parameters():
        p.data = p.data.float() if "lora_" in n else p.data.to(dtype)
    transformer.to(device).train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=device.type == "cuda")
    stamps = []
    for step in range(args.warmup + args.steps):
        i = step % len(batches)
        x0, (hidden, pooled) = latents[i].to(device), texts[i]
        b, c, h, w = x0.shape
        noise = torch.randn_like(x0)
        t = torch.sigmoid(torch.randn(b, device=device))
        noisy = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            pred = transformer(hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w), timestep=t,
                               pooled_projections=pooled.to(device), encoder_hidden_states=hidden.to(device),
                               txt_ids=torch.zeros(hidden.shape[1], 3, device=device),
                               img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, torch.float32),
                               return_dict=False)[0]
        target = FluxPipeline._pack_latents(noise - x0, b, c, h, w)
        _update(F.mse_loss(pred.float(), target.float()), params, opt, device, stamps)
    return _result(args, stamps)


def main(argv=None) -> None:
    args = _args(argv)
    args.resolution = args.resolution or (512 if args.device == "cuda" else 64)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.worker:
        sys.path.insert(0, str(ROOT / "tests"))  # flux_files: the widths of the benchmark's Flux files
        bare = run_bare_flux if args.family == "flux" else run_bare
        print(json.dumps(run_ours(args) if args.worker == "ours" else bare(args)))
        return
    from lora_trainer.cli.demo_data import make_demo_images

    folder = Path(tempfile.mkdtemp(prefix="bench-data-"))
    data = make_demo_images(folder, n=8, size=args.resolution * 3 // 2)
    checkpoint = random_flux_files() if args.family == "flux" else random_checkpoint(args.family, args.variant)
    if args.lora_types:
        return compare_types(args, argv, data, checkpoint)
    results = {}
    for worker in ("bare", "ours"):
        started = time.time()
        results[worker] = _worker(args, argv, worker, data, checkpoint)
        results[worker]["start_to_last"] = results[worker]["last_step_at"] - started
    bare, ours = results["bare"], results["ours"]
    mem = "peak GPU MiB" if args.device == "cuda" else "peak RSS MiB"
    what = "Flux.1 schnell, full width, 1 double + 1 single block" if args.family == "flux" else \
        f"{args.family} {args.variant} architecture"
    print(f"\n{what}, {args.resolution} px, batch {args.batch_size}, rank {args.rank}, "
          f"{_precision(args)}, {args.device}, median of {args.steps} steps\n")
    print(f"| loop | s/step | start → last step, s | {mem} |")
    print("| --- | ---: | ---: | ---: |")
    for name, r in (("bare diffusers + peft", bare), ("lora_trainer train(cfg)", ours)):
        print(f"| {name} | {r['s_per_step']:.4f} | {r['start_to_last']:.1f} | {r['peak_mb']:.0f} |")
    print(f"| ratio (ours / bare) | {ours['s_per_step'] / bare['s_per_step']:.3f} | "
          f"{ours['start_to_last'] / bare['start_to_last']:.3f} | {ours['peak_mb'] / bare['peak_mb']:.3f} |")


def _worker(args, argv, worker: str, data: Path, checkpoint: Path, *extra: str) -> dict:
    cmd = [sys.executable, __file__, *(argv or sys.argv[1:]), "--worker", worker, "--data", str(data),
           "--resolution", str(args.resolution), "--checkpoint", str(checkpoint), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{worker} loop failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare_types(args, argv, data: Path, checkpoint: Path) -> None:
    """One run of our loop per adapter type, same data and steps, one after another in fresh processes."""
    kinds = [k.strip() for k in args.lora_types.split(",") if k.strip()]
    results = {kind: _worker(args, argv, "ours", data, checkpoint, "--lora-type", kind) for kind in kinds}
    first = results[kinds[0]]
    print(f"\n{args.family} {args.variant} architecture, {args.resolution} px, batch {args.batch_size}, rank "
          f"{args.rank}, attention q/k/v/out, {_precision(args)}, {args.device}, median of {args.steps} steps\n")
    mem = "peak GPU MiB" if args.device == "cuda" else "peak RSS MiB"
    print(f"| lora_type | s/step | × {kinds[0]} | {mem} | × {kinds[0]} |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for kind, r in results.items():
        print(f"| {kind} | {r['s_per_step']:.4f} | {r['s_per_step'] / first['s_per_step']:.3f} | "
              f"{r['peak_mb']:.0f} | {r['peak_mb'] / first['peak_mb']:.3f} |")


if __name__ == "__main__":
    main()
