"""Images per second of the captioner (`lora_trainer.data.captions.Captioner`): sentence + tags + shape.

Two models, random weights (nothing is downloaded), loaded through the real path (a local
weights file given as `pretrained`):

- tiny: a toy CoCa (one layer per tower, width 32, 32 px input), the one the tests use;
- coca_ViT-L-14: the real architecture of the default captioner (about 640M parameters).

Random weights never write the end token, so every sentence runs to its token limit: rows at 12
tokens (a typical real caption) and 30 (the default limit, the worst case). The decoder has no
key/value cache (it uses open_clip's modules as they are), so a step costs more as the sentence
grows. Tag embeddings (once per model, then cached) are timed separately.

    python bench/caption_speed.py                         # CPU, batch 8
    python bench/caption_speed.py --device cuda           # GPU, fp16
    python bench/caption_speed.py --models tiny --batches 5 --max-tokens 30
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lora_trainer.data.captions.coca import TINY_COCA  # noqa: E402  (after the path insert)



def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", default="tiny,coca_ViT-L-14")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=1, help="timed batches per row (after one warm-up batch)")
    p.add_argument("--beams", default="1,3", help="beam widths to time")
    p.add_argument("--max-tokens", default="12,30", help="sentence lengths to time (real captions: ~10-15)")
    p.add_argument("--phrases", type=int, default=120, help="vocabulary slice used (and timed) for the tags")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return p.parse_args(argv)


def _weights(model: str, folder: Path) -> tuple[str, Path]:
    """(model argument, weights file) of a random-weight model saved the way a downloaded one would be."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from lora_trainer.data.captions.coca import resolve_model_name

    if model == "tiny":
        config = folder / "coca_tiny_bench.json"
        config.write_text(json.dumps(TINY_COCA), encoding="utf-8")
        model = str(config)
    torch.manual_seed(0)
    net = open_clip.create_model(resolve_model_name(model))
    path = folder / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    del net
    gc.collect()
    return model, path


def _images(n: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (384, 512, 3), dtype=np.uint8)) for _ in range(n)]


def _row(name: str, args, model: str, weights: Path, beams: int, tokens: int, folder: Path, images) -> dict:
    from lora_trainer.data.captions import CaptionOptions, Captioner, load_vocabulary

    vocab = folder / "vocab"
    if not vocab.is_dir():  # a slice of the shipped vocabulary: same ranking cost per image, quicker set-up
        vocab.mkdir()
        full = load_vocabulary()
        for category in full.categories:
            (vocab / f"{category}.txt").write_text("\n".join(full.of(category)[:args.phrases // 12]) + "\n")
    options = CaptionOptions(model=model, pretrained=str(weights), trigger="bench_style", device=args.device,
                             batch_size=args.batch_size, num_beams=beams, max_tokens=tokens,
                             vocabulary_dir=str(vocab), tag_cache_dir=str(folder / "tags"))
    start = time.perf_counter()
    with Captioner(options) as captioner:
        load_s = time.perf_counter() - start
        captioner.options.max_tokens = 5
        captioner.caption(images[:1])  # warm-up
        captioner.options.max_tokens = tokens
        start = time.perf_counter()
        for _ in range(args.batches):
            captions = captioner.caption(images[:args.batch_size])
        elapsed = time.perf_counter() - start
    count = args.batch_size * args.batches
    return {"model": name, "beams": beams, "tokens": tokens, "batch": args.batch_size, "load_s": load_s,
            "s_per_batch": elapsed / args.batches, "images_per_s": count / elapsed, "captions": len(captions)}


def _tag_embeddings(model: str, weights: Path, args, n: int) -> float:
    """Phrases per second through the model's text tower (the one-time cost of the tag cache)."""
    import torch

    from lora_trainer.data.captions import coca, load_vocabulary

    net = coca.load_coca(model, str(weights), args.device)
    phrases = list(load_vocabulary().phrases[:n])
    with torch.no_grad(), net.autocast():
        start = time.perf_counter()
        net.model.encode_text(net.tokenizer(phrases).to(net.device))
        elapsed = time.perf_counter() - start
    coca.release(net)
    return n / elapsed


def main(argv=None) -> int:
    args = _args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    images = _images(args.batch_size)
    rows, tags = [], {}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        with tempfile.TemporaryDirectory() as tmp:
            model, weights = _weights(name, Path(tmp))
            for tokens in [int(t) for t in args.max_tokens.split(",")]:
                for beams in [int(b) for b in args.beams.split(",")]:
                    rows.append(_row(name, args, model, weights, beams, tokens, Path(tmp), images))
                    print(json.dumps(rows[-1]), flush=True)
            tags[name] = _tag_embeddings(model, weights, args, args.phrases)
    print(f"\ndevice {args.device}, torch threads {torch.get_num_threads()}, random weights (every sentence runs "
          "to its token limit), images 512x384, tags on\n")
    print("| model | tokens | beams | batch | load s | s / batch | images / s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['tokens']} | {r['beams']} | {r['batch']} | {r['load_s']:.1f} "
              f"| {r['s_per_batch']:.2f} | {r['images_per_s']:.3g} |")
    print()
    for name, rate in tags.items():
        print(f"tag embeddings, {name}: {rate:.0f} phrases/s (once per model, then cached)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
