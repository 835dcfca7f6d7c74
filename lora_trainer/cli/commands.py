"""`python -m lora_trainer …`: train, plan, sample, score, demo, convert, merge, resize, caption, doctor, queue,
sweep, compare.

Errors the user can fix are printed as one line (exit code 2); `doctor` exits with 1 when the folder
has an error-level finding. Ctrl-C stops training after the current step and leaves a resumable
state (a second Ctrl-C aborts; see console.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

from .console import ConsoleCallbacks, run_training
from ..errors import LoraTrainerError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lora_trainer", description="Train Stable Diffusion LoRAs.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a LoRA from a YAML config")
    t.add_argument("--config", help="YAML config (see configs/)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    t.add_argument("--resume", metavar="DIR", help="continue from a run's output_dir or state folder")
    t.add_argument("--gpus", type=int, default=1, metavar="N",
                   help="train with N processes on this machine through torchrun (data parallel): N GPUs, or N CPU "
                   "processes with device: cpu; batch_size is per process")
    t.add_argument("--nnodes", type=int, default=1, metavar="M",
                   help="machines taking part (run the same command on each, with --rdzv-endpoint)")
    t.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                   help="with --nnodes: where the machines meet (one of them; the same on every machine)")
    t.add_argument("--rdzv-timeout", type=float, default=900, metavar="S",
                   help="with --nnodes: how long to wait for the other machines (default: %(default)s s)")

    m = sub.add_parser("plan", help="predict a run's peak memory before loading anything, and what fits a budget")
    m.add_argument("--config", help="YAML config (see configs/)")
    m.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    m.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the config's device)")
    m.add_argument("--budget-gb", default=None, metavar="X",
                   help="a number of GB, or auto (free memory now); default: the config's memory_budget_gb")
    m.add_argument("--json", action="store_true", help="print the plan as JSON")

    s = sub.add_parser("sample", help="render a labelled strength grid of a LoRA")
    s.add_argument("--base-model", required=True)
    s.add_argument("--lora", required=True)
    s.add_argument("--prompt", action="append", required=True, help="repeat for several rows")
    s.add_argument("--negative-prompt", default="")
    s.add_argument("--strengths", default="0,0.5,0.6,0.7,0.8", help="comma-separated; 0 is the base model")
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    s.add_argument("--output", default=None, help="PNG path (default: next to the LoRA)")
    s.add_argument("--allow-ckpt", action="store_true")
    _flux_arguments(s)

    r = sub.add_parser("score", help="render a LoRA at several strengths and score each with CLIP: style, "
                       "fidelity to the prompt, the best strength")
    r.add_argument("--base-model", required=True)
    r.add_argument("--lora", required=True)
    r.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    r.add_argument("--reference-dir", required=True, metavar="DIR", help="the training images: the style to match")
    r.add_argument("--strengths", default="0.5,0.6,0.7,0.8",
                   help="comma-separated; the base (0) is rendered too, as the fidelity reference")
    r.add_argument("--trigger", default=None, metavar="W",
                   help="trigger word taken out of the prompts for fidelity (default: from the LoRA's metadata)")
    r.add_argument("--clip-model", default="coca_ViT-L-14", help="the captioner's open_clip CoCa model")
    r.add_argument("--clip-weights", default="mscoco_finetuned_laion2B-s13B-b90k", metavar="PATH",
                   help="its weights file, or an open_clip pretrained tag looked up on this machine "
                   "(default: %(default)s, the captioner's)")
    r.add_argument("--negative-prompt", default="")
    r.add_argument("--seed", type=int, default=1)
    r.add_argument("--steps", type=int, default=20)
    r.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    r.add_argument("--output", default=None, help="also write the labelled grid PNG here")
    r.add_argument("--allow-ckpt", action="store_true")
    r.add_argument("--json", action="store_true", help='print {"scores": [...], "best": ...} as JSON')
    _flux_arguments(r)

    d = sub.add_parser("demo", help="train a tiny LoRA end to end on generated images (CPU, a few minutes)")
    d.add_argument("--output", default="output/demo")
    d.add_argument("--steps", type=int, default=30)

    c = sub.add_parser("convert", help="rewrite a peft/diffusers LoRA (SD or Flux.1) in the kohya layout the hosts load")
    c.add_argument("--input", required=True)
    c.add_argument("--output", required=True)
    c.add_argument("--family", default="auto", choices=["auto", "sd1", "sd2", "sdxl", "flux-dev", "flux-schnell"],
                   help="the base the LoRA is for (default: from its keys; a Flux.1 LoRA is taken as flux-dev)")
    c.add_argument("--alpha", type=float, default=None, help="alpha to write when the file has none")
    c.add_argument("--save-precision", default=None, choices=["fp16", "bf16", "fp32"],
                   help="precision of the written weights (default: the input file's)")

    g = sub.add_parser("merge", help="bake LoRAs into a checkpoint (--base), or merge several LoRAs into one")
    g.add_argument("--base", default=None, metavar="CKPT",
                   help="single-file .safetensors checkpoint (SD1.x/SD2.x/SDXL); without it the LoRAs become one LoRA")
    g.add_argument("--lora", action="append", required=True, metavar="FILE[:STRENGTH]",
                   help="a LoRA and its strength (default 1); repeat for several")
    g.add_argument("--output", required=True, help="the new .safetensors file (an existing one is never replaced)")
    g.add_argument("--precision", default=None, choices=["fp16", "bf16", "fp32"],
                   help="dtype written (default: a checkpoint keeps each tensor's own, a LoRA is fp16)")
    g.add_argument("--rank", type=int, default=None,
                   help="without --base: factor each module's summed update by SVD to this rank "
                   "(default: stack the ranks, exact)")

    z = sub.add_parser("resize", help="reduce a LoRA's rank by SVD (kohya's resize: alpha keeps the update's scale)")
    z.add_argument("--input", required=True)
    z.add_argument("--output", required=True)
    how = z.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, help="the new rank of every module (never above its own)")
    how.add_argument("--dynamic", metavar="sv_fro:X",
                     help="per module, the smallest rank keeping X of the update's Frobenius norm")
    z.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"])

    k = sub.add_parser("caption", help="caption every image of a folder (open_clip CoCa + ranked tags)")
    k.add_argument("--input", required=True, help="the image folder")
    k.add_argument("--output", default=None, help="captions file (default: <input>/metadata.<format>)")
    k.add_argument("--format", default=None, choices=["csv", "jsonl", "txt"],
                   help="csv (file,caption), jsonl, or txt sidecars (default: from --output, else csv)")
    k.add_argument("--trigger", default="", help="trigger word written first in every new caption")
    k.add_argument("--model", default="coca_ViT-L-14", help="open_clip CoCa model, e.g. coca_ViT-B-32 (smaller)")
    k.add_argument("--pretrained", default="mscoco_finetuned_laion2B-s13B-b90k", metavar="PATH",
                   help="local weights file (.safetensors/.bin), or an open_clip pretrained tag (default: %(default)s)")
    k.add_argument("--download", action="store_true", help="download missing weights from the Hugging Face hub")
    k.add_argument("--overwrite", action="store_true",
                   help="caption images that already have a caption (the old ones are backed up first)")
    k.add_argument("--batch-size", type=int, default=8)
    k.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    k.add_argument("--beams", type=int, default=3, help="beam search width (1: greedy, fastest)")
    k.add_argument("--no-tags", action="store_true", help="the sentence only, no vocabulary tags")
    k.add_argument("--tag-threshold", type=float, default=0.3, help="probability a tag needs within its category")
    k.add_argument("--max-tags", type=int, default=6)
    k.add_argument("--vocabulary", default="", metavar="DIR", help="folder of <category>.txt phrase lists to use")
    o = sub.add_parser("doctor", help="check an image folder before training: unreadable, too small, duplicate, "
                       "uncaptioned images, captions over 75 tokens ...")
    o.add_argument("folder", nargs="?", metavar="DIR", help="the image folder (default: the config's train_data_dir)")
    o.add_argument("--config", help="YAML config for the buckets, steps and caption settings (default: the defaults)")
    o.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    o.add_argument("--metadata", metavar="F", default=None,
                   help="captions file (default: metadata_path, else metadata.csv/.jsonl or .txt sidecars in DIR)")
    o.add_argument("--trigger", metavar="W", default=None,
                   help="trigger word every caption should hold (default: the config's trigger_word)")
    o.add_argument("--json", action="store_true", help="print the report as JSON")
    q = sub.add_parser("queue", help="queue runs and run them one at a time, in order (an interrupted one resumes "
                       "first); docs/experiments.md")
    q.add_argument("action", choices=["add", "list", "run", "cancel"])
    q.add_argument("id", nargs="?", help="cancel: the run's id (queue list shows them)")
    q.add_argument("--config", help="add: YAML config of the run")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="add: override a config key")
    q.add_argument("--root", default="output", help="output root that holds the queue folder (default: %(default)s)")
    q.add_argument("--json", action="store_true", help="list: print the runs as JSON")

    w = sub.add_parser("sweep", help="queue one run per combination of --grid values, run them sharing one cache, "
                       "and compare them")
    w.add_argument("--config", required=True, help="YAML config every run starts from")
    w.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key in every run")
    w.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2",
                   help="a config key and its values; repeat for more keys (every combination is a run)")
    w.add_argument("--seeds", type=int, default=1, metavar="N", help="N runs per combination: seed, seed+1, …")
    w.add_argument("--root", default="output", help="output root that holds the queue folder (default: %(default)s)")
    w.add_argument("--no-run", action="store_true", help="only queue the runs (queue run trains them)")
    _compare_arguments(w)

    v = sub.add_parser("compare", help="compare runs: a table (val_loss, CLIP strength, steps, time, peak), the best "
                       "run, and a strength grid (one run: its checkpoints)")
    v.add_argument("runs", nargs="+", metavar="RUN_DIR", help="output folders of training runs")
    v.add_argument("--output", default=None, metavar="DIR",
                   help="where compare.png and compare.html go (default: the runs' common folder)")
    v.add_argument("--json", action="store_true", help="print the comparison as JSON")
    _compare_arguments(v)

    u = sub.add_parser("ui", help="serve the Train LoRA tab in a browser, without a WebUI (needs gradio)")
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=7861)
    u.add_argument("--output", default="output", help="folder the LoRAs are trained into")
    u.add_argument("--base-model", default="", help="checkpoint path the form starts with")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"train": _train, "plan": _plan, "sample": _sample, "score": _score, "demo": _demo,
                "convert": _convert, "merge": _merge, "resize": _resize, "caption": _caption, "doctor": _doctor,
                "queue": _queue, "sweep": _sweep, "compare": _compare, "ui": _ui}[args.command](args)
    except LoraTrainerError as e:
        print(f"{_rank_label()}error: {e}", file=sys.stderr)
        return 2


def _rank_label() -> str:
    """"[rank 1] " in the processes other than rank 0 of a torchrun run; "" elsewhere."""
    from ..training.distributed import launched_by_torchrun

    rank = os.environ.get("RANK", "0")
    return f"[rank {rank}] " if launched_by_torchrun() and rank != "0" else ""


def _train(args) -> int:
    from ..config import load_config
    from ..training.distributed import launched_by_torchrun, process_group
    from ..training.launch import STOPPED, launch

    if not args.config and not args.resume and not any(kv.startswith("train_data_dir=") for kv in args.set):
        raise LoraTrainerError("Give the run's config: python -m lora_trainer train --config my_run.yaml "
                               "(start from an example in configs/; `python -m lora_trainer demo` needs none).")
    cfg = load_config(args.config, args.set)  # a bad config is said once, before any process starts
    if (args.gpus != 1 or args.nnodes != 1) and not launched_by_torchrun():
        again = ["--config", args.config] if args.config else []
        again += [x for kv in args.set for x in ("--set", kv)] + (["--resume", args.resume] if args.resume else [])
        return launch(again, args.gpus, cfg.device, args.nnodes, args.rdzv_endpoint, args.rdzv_timeout)
    with process_group(cfg.device) as processes:
        result = run_training(cfg, resume=args.resume, quiet=not processes.main)
    if not processes.main:
        return STOPPED if result.stopped else 0
    if result.stopped:
        print(f"stopped at step {result.steps}; continue with: --resume {result.output_dir or cfg.output_dir}")
        return STOPPED if processes.many else 1
    print(f"LoRA: {result.lora_path}")
    return 0


def _plan(args) -> int:
    from ..config import load_config
    from ..training.plan import plan_memory

    cfg = load_config(args.config, args.set)
    budget = args.budget_gb if args.budget_gb is not None else cfg.memory_budget_gb
    plan = plan_memory(cfg, args.device, budget)
    print(plan.to_json() if args.json else plan.summary())
    return 0


def _sample(args) -> int:
    from ..adapters.export import load_lora_file
    from ..model import load_components
    from ..evaluate.sample import parse_strengths, render_grid

    strengths = parse_strengths(args.strengths, "--strengths")
    components = load_components(args.base_model, allow_ckpt=args.allow_ckpt, flux_parts=flux_parts(args))
    load_lora_file(components, args.lora)
    out = Path(args.output) if args.output else Path(args.lora).with_suffix(".grid.png")
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    render_grid(components, args.prompt, strengths, out, seed=args.seed, steps=args.steps, device=device,
                size=args.size, negative_prompt=args.negative_prompt)
    print(f"grid: {out}")
    return 0


FLUX_FILES = ("clip_l", "t5xxl", "vae", "t5_tokenizer")


def _flux_arguments(parser) -> None:
    from ..config import field_help

    group = parser.add_argument_group("Flux.1 (a --base-model that is a Flux transformer; docs/flux.md)")
    for key in FLUX_FILES:
        group.add_argument(f"--{key.replace('_', '-')}", default="", metavar="PATH", help=field_help()[key]["help"])


def flux_parts(args) -> dict:
    """The Flux files the arguments name; a Flux base missing one is said now, before anything renders."""
    from ..model.flux import flux_files, is_flux_file

    parts = {key: getattr(args, key) for key in FLUX_FILES}
    if is_flux_file(args.base_model):
        flux_files(args.base_model, parts)
    return parts


def _score(args) -> int:
    import torch

    from ..data.captions.weights import MissingWeights
    from ..files import atomic_write_with
    from ..adapters.export import load_lora_file
    from ..training.memory import release
    from ..model import load_components
    from ..model.loader import base_model_path
    from ..evaluate.sample import label_grid, parse_strengths, render_images
    from ..evaluate.score import StrengthScorer, check_weights, deterministic, rank_strengths, read_trigger, reference_files
    from ..evaluate.score import save_scores, with_base

    strengths = parse_strengths(args.strengths, "--strengths")
    # What can be missing is said now, not after minutes of rendering: the user's files before the scorer's.
    lora_trigger = read_trigger(args.lora)
    base_model_path(args.base_model)
    parts = flux_parts(args)
    reference_files(args.reference_dir)
    try:
        check_weights(args.clip_model, args.clip_weights)
    except MissingWeights as e:
        raise LoraTrainerError(e.in_words(option="--clip-weights", download_option="")) from None
    trigger = args.trigger if args.trigger is not None else lora_trigger
    rendered = with_base(strengths)
    components = load_components(args.base_model, allow_ckpt=args.allow_ckpt, flux_parts=parts)
    load_lora_file(components, args.lora)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with deterministic():
        rows = render_images(components, args.prompt, rendered, args.seed, args.steps, device, args.size,
                             args.negative_prompt)
    del components  # the base model goes before the scorer comes
    release()
    with StrengthScorer(args.reference_dir, args.clip_model, args.clip_weights) as scorer:
        report = rank_strengths(scorer.score_images(rows, rendered, args.prompt, trigger), strengths)
    for skipped in scorer.skipped:
        print(f"skipped reference {skipped}", file=sys.stderr)
    if args.output:
        labels = [f"strength {s:g}" + (" (base)" if s == 0 else " (best)" if s == report.best else "")
                  for s in rendered]
        grid = label_grid(rows, labels, list(args.prompt), args.seed)
        atomic_write_with(Path(args.output), lambda tmp: grid.save(tmp, format="PNG"))
    kept = save_scores(Path(args.lora), report)
    if args.json:
        print(report.to_json())
        return 0
    print(f"scores: {kept}")
    print(f"trigger {trigger!r} taken out of the prompts" if trigger else "no trigger word taken out of the prompts")
    print(report.table())
    if args.output:
        print(f"grid: {args.output}")
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    result = run_demo(Path(args.output), steps=args.steps)
    print(f"grid: {result.output_dir / 'samples'} (the demo's model has random weights, so the grid shows noise at "
          "every strength; trained on a real checkpoint as base_model, the same grid shows the style growing with "
          "the strength)")
    print(f"LoRA: {result.lora_path}")
    return 0


def _convert(args) -> int:
    from ..adapters.export import (BASE_MODEL_VERSION, SAVE_DTYPES, dora_on_output, is_dora, lycoris_metadata,
                                   network_metadata, peft_alpha, read_lora, save_lora, stored_precision, to_kohya)
    from ..adapters.keymap import family_of_keys
    from ..adapters.lycoris import kind_of

    tensors, meta = read_lora(Path(args.input))
    precision = args.save_precision or stored_precision(Path(args.input))
    if all(k.startswith(("lora_unet_", "lora_te")) for k in tensors):
        print(f"{Path(args.input).name} is already in the kohya layout: written again in {precision}"
              + ("" if args.save_precision else " (its own precision; --save-precision changes it)"))
    family = args.family
    if family == "auto":
        family = {"flux": "flux-dev", "sdxl": "sdxl"}.get(family_of_keys(list(tensors)), "sd1")
    flux = family.startswith("flux")
    alpha = args.alpha if args.alpha is not None else peft_alpha(Path(args.input))
    kohya = to_kohya(tensors, "flux" if flux else family, 2 if family == "sdxl" else 1, default_alpha=alpha)
    meta.setdefault("ss_output_name", Path(args.output).stem)
    meta.setdefault("ss_base_model_version", BASE_MODEL_VERSION["flux" if flux else family])
    meta.setdefault("ss_v2", str(family == "sd2"))
    if flux:  # what kohya's Flux trainer records; ComfyUI and Forge read the keys alone
        meta.setdefault("modelspec.architecture", f"{family.replace('flux-', 'flux-1-')}/lora")
        meta.setdefault("ss_network_module", "networks.lora_flux")
    kind = kind_of(kohya)
    network = lycoris_metadata(kind) if kind else network_metadata(is_dora(kohya), on_output=dora_on_output(kohya))
    for key, value in network.items():
        meta.setdefault(key, value)
    out = save_lora(Path(args.output), {k: v.to(SAVE_DTYPES[precision]) for k, v in kohya.items()}, meta)
    layers = len({k.rsplit(".", 2 if k.endswith(".weight") else 1)[0] for k in kohya if not k.endswith(".alpha")})
    print(f"wrote {out} ({layers} layers{f', {kind}' if kind else ''}, {precision})")
    return 0


def _merge(args) -> int:
    from ..adapters.merge import merge_into_checkpoint, parse_lora_arg
    from ..adapters.resize import format_table, merge_lora_files

    loras = [parse_lora_arg(text) for text in args.lora]
    if args.rank is not None and args.rank < 1:
        raise LoraTrainerError(f"--rank {args.rank}: give a rank of 1 or more.")
    if args.base:
        if args.rank is not None:
            raise LoraTrainerError("--rank applies to merging LoRAs into one LoRA; leave it out with --base.")
        out = merge_into_checkpoint(Path(args.base), loras, Path(args.output), args.precision)
        print(f"checkpoint: {out}")
        return 0
    out, table = merge_lora_files(loras, Path(args.output), args.rank, args.precision or "fp16")
    if args.rank is not None:
        print(format_table(table))
    print(f"LoRA: {out}")
    return 0


def _resize(args) -> int:
    from ..adapters.resize import format_table, parse_dynamic, resize_lora_file

    if args.rank is not None and args.rank < 1:
        raise LoraTrainerError(f"--rank {args.rank}: give a rank of 1 or more.")
    fro = parse_dynamic(args.dynamic) if args.dynamic else None
    out, table = resize_lora_file(Path(args.input), Path(args.output), args.rank, fro, args.precision)
    print(format_table(table))
    print(f"LoRA: {out}")
    return 0


def _caption(args) -> int:
    from ..data.captions import CaptionOptions, run_captioning

    options = CaptionOptions(model=args.model, pretrained=args.pretrained, trigger=args.trigger,
                             tags=not args.no_tags, tag_threshold=args.tag_threshold, max_tags=args.max_tags,
                             vocabulary_dir=args.vocabulary, batch_size=args.batch_size, device=args.device,
                             num_beams=args.beams, allow_download=args.download)
    console = ConsoleCallbacks(unit="image")
    try:
        report = run_captioning(args.input, args.output, args.format, options, args.overwrite, console)
    except KeyboardInterrupt:
        console.close()
        print("stopped: the captions written so far are saved; run again to caption the rest")
        return 1
    finally:
        console.close()
    print(report.summary())
    return 0


def _doctor(args) -> int:
    from ..config import load_config
    from ..data.doctor import examine

    cfg = load_config(args.config, args.set)
    if not args.folder and not cfg.train_data_dir:
        raise LoraTrainerError("Give the image folder: python -m lora_trainer doctor DIR "
                               "(or --config with a train_data_dir).")
    console = ConsoleCallbacks(unit="image")
    try:
        report = examine(args.folder, cfg, args.metadata, args.trigger, console.on_progress)
    finally:
        console.close()
    print(report.to_json() if args.json else report.text())
    return 0 if report.ok else 1


def _compare_arguments(parser) -> None:
    group = parser.add_argument_group("the comparison grid (default: the first run's sample settings)")
    group.add_argument("--prompt", action="append", default=None, help="repeat for several rows per run")
    group.add_argument("--strengths", default=None, help="comma-separated columns (default: sample_strengths)")
    group.add_argument("--seed", type=int, default=None)
    group.add_argument("--steps", type=int, default=None, help="sampling steps (default: sample_steps)")
    group.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    group.add_argument("--no-grid", action="store_true", help="the table only: no base model is loaded")


def _queue(args) -> int:
    from ..config import load_config
    from ..experiments.queue import Queue

    queue = Queue(args.root)
    if args.action == "add":
        if not args.config and not args.set:
            raise LoraTrainerError("queue add needs the run's config: --config my_run.yaml [--set key=value]")
        job = queue.add(load_config(args.config, args.set))
        print(f"queued {job['id']}: {job['name']} (python -m lora_trainer queue run --root {args.root} trains it)")
        return 0
    if args.action == "cancel":
        if not args.id:
            raise LoraTrainerError("queue cancel needs the run's id: python -m lora_trainer queue list shows them.")
        job = queue.cancel(args.id)
        print(f"{job['id']} {job['name']}: " + ("stops after its current step" if job.get("cancel") else "cancelled"))
        return 0
    if args.action == "list":
        jobs = queue.jobs()
        if args.json:
            print(json.dumps([{k: j[k] for k in ("id", "name", "state", "step", "total", "output_dir", "lora", "error")}
                              for j in jobs]))
        for j in [] if args.json else jobs:
            progress = f"{j['step']}/{j['total']}" if j["total"] else ""
            print(f"{j['id']}  {j['state']:<9}  {progress:>9}  {j['name']}  {j['error'] or j['output_dir'] or ''}")
        if not jobs and not args.json:
            print(f"the queue in {queue.folder} is empty")
        return 0
    ran = queue.run(_queued_training)
    return _after_queue(ran)


def _queued_training(cfg, callbacks, resume):
    return run_training(cfg, resume=resume, also=callbacks)


def _after_queue(ran) -> int:
    for job in ran:
        print(f"{job['id']} {job['name']}: {job['state']}" + (f" — {job['lora']}" if job["lora"] else "")
              + (f" — {job['error']}" if job["error"] else ""))
    if ran and ran[-1]["state"] == "stopped":
        print("the queue stopped; `queue run` resumes this run first")
        return 1
    return 0 if all(job["state"] == "done" for job in ran) else 1


def _sweep(args) -> int:
    from ..experiments.queue import Queue
    from ..experiments.sweep import parse_grid, sweep_configs

    configs = sweep_configs(args.config, args.set, parse_grid(args.grid), args.seeds)
    queue = Queue(args.root)
    jobs = [queue.add(cfg, sweep=str(Path(configs[0].output_dir).parent)) for cfg in configs]
    print(f"queued {len(jobs)} runs: " + ", ".join(j["name"] for j in jobs))
    if args.no_run:
        return 0
    ran = queue.run(_queued_training, only=[j["id"] for j in jobs])
    code = _after_queue(ran)
    done = [queue.get(j["id"]) for j in jobs]
    finished = [j["output_dir"] for j in done if j["state"] == "done"]
    if finished:
        args.output, args.json = str(Path(configs[0].output_dir).parent), False
        _compare_runs(finished, args)
    return code


def _compare(args) -> int:
    return _compare_runs(args.runs, args)


def _compare_runs(folders, args) -> int:
    from ..evaluate.report import write_compare_report
    from ..evaluate.sample import parse_strengths
    from ..experiments.compare import compare_runs, read_run, render_comparison, table

    comparison = compare_runs(folders)
    out = Path(args.output) if args.output else Path(os.path.commonpath([str(Path(f).resolve()) for f in folders]))
    if len(folders) == 1 and not args.output:
        out = Path(folders[0])
    grid = None
    if not args.no_grid:
        import torch

        runs = [read_run(f) for f in folders]
        cfg = runs[0].config
        prompts = args.prompt or cfg.get("sample_prompts") or [cfg.get("trigger_word") or "a picture"]
        strengths = parse_strengths(args.strengths, "--strengths") if args.strengths else \
            [float(s) for s in cfg.get("sample_strengths") or (0, 0.5, 0.75, 1.0)]
        seed = args.seed if args.seed is not None else int(cfg.get("seed", 1))
        steps = args.steps or int(cfg.get("sample_steps") or 20)
        grid = out / "compare.png"
        if not args.json:
            print(f"rendering {len(prompts)} prompt(s) × {len(strengths)} strengths per row …", file=sys.stderr)
        render_comparison(runs, prompts, strengths, seed, steps, "cuda" if torch.cuda.is_available() else "cpu",
                          grid, args.size)
    page = write_compare_report(out / "compare.html", comparison, grid)
    if args.json:
        print(json.dumps(comparison))
        return 0
    print(table(comparison))
    if grid is not None:
        print(f"grid: {grid}")
    print(f"page: {page}")
    return 0


def _ui(args) -> int:
    import importlib.util

    if importlib.util.find_spec("gradio") is None:  # the core never needs it; only this command does
        raise LoraTrainerError("The standalone UI needs gradio, which this Python does not have: "
                               f"{sys.executable} -m pip install gradio, then run this again.")
    from ..ui import serve

    serve(args.host, args.port, args.output, args.base_model)
    return 0
