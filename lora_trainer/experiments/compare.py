"""Comparing runs: a table of what each run reached, the best one named, and a labelled strength grid.

A run folder is what `train` writes: `config.yaml` (the settings really used), `run.json` (steps, time, peak),
`logs/train.jsonl` (loss and val_loss), the LoRA and its checkpoints, and `<lora>.scores.json` once `score`
ran on it. The best run is the one with the lowest validation loss (its best one, as save_best keeps it);
when the runs were scored with CLIP too and CLIP's favourite is another run, the comparison says so.

The grid: one row per run (its finished LoRA), or, for a single run, one row per checkpoint (every
save_steps file and the finished one); one column per strength; the same prompts and seed everywhere.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..errors import ConfigError


@dataclass
class RunSummary:
    name: str
    path: str
    config: Dict[str, Any]
    val_loss_final: Optional[float]
    val_loss_best: Optional[float]
    best_strength: Optional[float]
    clip_score: Optional[float]
    steps: Optional[int]
    seconds: Optional[float]
    peak_bytes: Optional[int]
    lora: Optional[str] = None
    checkpoints: List[str] = field(default_factory=list, repr=False)  # step files, oldest first


def read_run(folder: Any) -> RunSummary:
    """What a run folder holds; a folder that is not a run is refused in one line."""
    from ..evaluate.score import read_scores

    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder: give the output_dir of a training run.")
    record = _json_file(folder / "run.json") or {}
    config = _config(folder)
    log = folder / "logs" / "train.jsonl"
    if config is None or not (record or log.is_file()):
        raise ConfigError(f"{folder} is not a run folder (no config.yaml, run.json or logs/train.jsonl): give the "
                          "output_dir of a training run.")
    val, last_step = _validation(log)
    name = record.get("name") or config.get("output_name") or folder.name
    lora = record.get("lora") or _first(folder.glob(f"{name}.safetensors"))
    scores = read_scores(lora) if lora else None
    best_strength = clip = None
    if scores:
        best_strength = scores.get("best")
        clip = next((s["combined"] for s in scores.get("scores", []) if s.get("strength") == best_strength), None)
    return RunSummary(
        name=name, path=str(folder), config=config,
        val_loss_final=val[-1][1] if val else None, val_loss_best=min(v for _, v in val) if val else None,
        best_strength=best_strength, clip_score=clip, steps=record.get("steps", last_step),
        seconds=record.get("seconds"), peak_bytes=record.get("peak_bytes") or None,
        lora=str(lora) if lora else None,
        checkpoints=[str(p) for p in sorted(folder.glob(f"{name}-step*.safetensors"))])


def compare_runs(folders: Sequence[Any]) -> Dict[str, Any]:
    """`{"best", "notes", "runs": [...]}` — what `compare --json` prints."""
    if not folders:
        raise ConfigError("Give the run folders to compare: python -m lora_trainer compare output/a output/b")
    runs = [read_run(f) for f in folders]
    notes: List[str] = []
    measured = [r for r in runs if r.val_loss_best is not None]
    best = min(measured, key=lambda r: r.val_loss_best).name if measured else None
    if not measured:
        notes.append("no run measured a validation loss: set validation_split (e.g. 0.1) or validation_dir to "
                     "let compare name the best run")
    elif len(measured) < len(runs):
        notes.append("without a validation loss, not ranked: " + ", ".join(r.name for r in runs if r not in measured))
    scored = [r for r in runs if r.clip_score is not None]
    if scored:
        clip_best = max(scored, key=lambda r: r.clip_score)
        if best is not None and clip_best.name != best:
            notes.append(f"validation and CLIP disagree: the lowest val_loss is {best}, the best CLIP score is "
                         f"{clip_best.name} (at strength {clip_best.best_strength:g}); look at the grid")
        elif best is not None:
            notes.append(f"validation and CLIP agree on {best}")
    return {"best": best, "notes": notes,
            "runs": [{k: v for k, v in asdict(r).items() if k not in ("lora", "checkpoints")} for r in runs]}


def table(comparison: Dict[str, Any]) -> str:
    """The comparison as the terminal shows it."""
    head = ("run", "val final", "val best", "strength", "CLIP", "steps", "time", "peak")
    rows = [head]
    for r in comparison["runs"]:
        rows.append((("* " if r["name"] == comparison["best"] else "  ") + r["name"], _num(r["val_loss_final"]),
                     _num(r["val_loss_best"]), _num(r["best_strength"], "g"), _num(r["clip_score"]),
                     str(r["steps"] if r["steps"] is not None else "—"), _duration(r["seconds"]),
                     f"{r['peak_bytes'] / 2**30:.1f} GB" if r["peak_bytes"] else "—"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.append(f"best by validation loss: {comparison['best']}" if comparison["best"] else "no best run")
    return "\n".join(lines + comparison["notes"])


def grid_rows(runs: Sequence[RunSummary]) -> List[Tuple[str, str]]:
    """(label, LoRA file) per grid row: each run's finished LoRA, or one run's checkpoints and its LoRA."""
    if len(runs) == 1:
        run = runs[0]
        rows = [(f"step {int(Path(p).stem.rsplit('-step', 1)[1])}", p) for p in run.checkpoints]
        rows += [(f"{run.name} (final)", run.lora)] if run.lora else []
    else:
        rows = [(run.name, run.lora) for run in runs if run.lora]
    if not rows:
        raise ConfigError("No finished LoRA or checkpoint in these runs to render: compare them with --no-grid, or "
                          "let them finish.")
    return rows


def render_comparison(runs: Sequence[RunSummary], prompts: Sequence[str], strengths: Sequence[float], seed: int,
                      steps: int, device: Any, out: Path, size: Optional[int] = None) -> Any:
    """The labelled grid PNG at `out`: rows (grid_rows) × prompts, columns strengths, one seed. Each row loads
    the base model afresh (a LoRA is never left in another's weights) and frees it before the next."""
    from ..adapters.export import load_lora_file
    from ..evaluate.sample import label_grid, render_images
    from ..files import atomic_write_with
    from ..model import load_components

    cfg = runs[0].config
    bases = {r.config.get("base_model") for r in runs}
    if len(bases) > 1:
        raise ConfigError("These runs trained on different base models; the grid renders on one: compare runs of "
                          "one base, or use --no-grid.")
    images, labels = [], []
    for label, lora in grid_rows(runs):
        components = load_components(cfg.get("base_model"), allow_ckpt=bool(cfg.get("allow_ckpt")),
                                     flux_parts={k: cfg.get(k) or "" for k in ("clip_l", "t5xxl", "vae", "t5_tokenizer")})
        load_lora_file(components, Path(lora))
        for prompt, row in zip(prompts, render_images(components, prompts, strengths, seed, steps, device, size)):
            images.append(row)
            labels.append(label if len(prompts) == 1 else f"{label} · {prompt}")
        del components
    grid = label_grid(images, [f"strength {s:g}" for s in strengths], labels, seed)
    atomic_write_with(out, lambda tmp: grid.save(tmp, format="PNG"))
    return grid


def _config(folder: Path) -> Optional[Dict[str, Any]]:
    """config.yaml, else the config a LoRA file of the run carries in its metadata (runs of older versions)."""
    import yaml

    path = folder / "config.yaml"
    if path.is_file():
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else None
        except yaml.YAMLError:
            return None
    from ..adapters.export import read_lora

    for lora in sorted(folder.glob("*.safetensors")):
        try:
            meta = read_lora(lora, with_tensors=False)[1]
            return json.loads(meta["lora_trainer.config"])
        except Exception:  # not ours, or not a LoRA: try the next file
            continue
    return None


def _validation(log: Path) -> Tuple[List[Tuple[int, float]], Optional[int]]:
    """(step, val_loss) in step order (a resumed run's repeat of a step: the later line wins), the last step."""
    val: Dict[int, float] = {}
    last = None
    try:
        lines = log.read_text(encoding="utf-8").splitlines()
    except OSError:
        return [], None
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        if event.get("event") == "validation":
            val[int(event["step"])] = float(event["val_loss"])
        elif event.get("event") == "loss":
            last = int(event["step"])
    return sorted(val.items()), last


def _json_file(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _first(paths: Any) -> Optional[Path]:
    return next(iter(sorted(paths)), None)


def _num(value: Optional[float], fmt: str = ".5g") -> str:
    return "—" if value is None else format(value, fmt)


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "—"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
