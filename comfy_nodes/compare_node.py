"""Compare LoRAs: several LoRAs, one run's checkpoints or several runs, side by side on the graph's model.

Rows are the LoRAs, columns the strengths, the same prompt and seed everywhere: the layout of
`python -m lora_trainer compare`'s grid (lora_trainer.evaluate.sample.label_grid). Each picture is rendered
as LoRA Strength Grid renders it — ComfyUI's LoRA loader on clones of the graph's MODEL and CLIP, KSampler,
VAEDecode — so no LoRA stays in the graph's model, and the CLI's loading of the base from the run's config
is not needed: the graph already holds the base. The text is the CLI's compare table for run folders
(lora_trainer.experiments.compare), and for plain files what their metadata says.
"""

from __future__ import annotations

import difflib
import hashlib
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from ..lora_trainer.adapters.export import read_lora
from ..lora_trainer.config import field_help
from ..lora_trainer.errors import ConfigError
from ..lora_trainer.evaluate.sample import label_grid, parse_strengths
from ..lora_trainer.experiments.compare import compare_runs, grid_rows, read_run, table
from .fingerprint import folder_fingerprint
from .grid_node import render
from .host import load_lora_file
from .images import image_to_pil, pil_to_image
from .train_node import CATEGORY

Rows = List[Tuple[str, str]]  # (row label, LoRA file)


class CompareLoRAs:
    DESCRIPTION = ("Render the same prompt and seed with several LoRAs (or one training run's checkpoints, or several "
                   "runs) at several strengths on the graph's model: one labelled row per LoRA, and a table of what "
                   "each reached (validation loss, rank).")
    CATEGORY = CATEGORY
    FUNCTION = "compare"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("grid", "table")
    OUTPUT_TOOLTIPS = ("One labelled row per LoRA or checkpoint, one column per strength.",
                       "Run folders: the compare table (validation loss, best strength, steps, time) and the best "
                       "run. LoRA files: type, rank, alpha and validation loss from each file's metadata.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The base model (without a LoRA): the one the LoRAs were trained on."}),
                "clip": ("CLIP", {"tooltip": "The base model's CLIP."}),
                "vae": ("VAE", {"tooltip": "Decodes the samples."}),
                "loras": ("STRING", {"default": "", "multiline": True, "tooltip": "LoRAs to compare, one per line: "
                          "names as LoRA Loader lists them (models/loras) or absolute paths. Leave empty to use "
                          "run_folder."}),
                "run_folder": ("STRING", {"default": "", "multiline": True, "tooltip": "Instead of loras: a "
                               "training run's output folder (rows: its checkpoints and the finished LoRA), or "
                               "several, one per line (rows: each run's finished LoRA). A name alone is looked up "
                               "in output/lora_trainer/."}),
                "prompt": ("STRING", {"default": "", "multiline": True, "tooltip": "Prompt; put the trigger word in."}),
                "negative": ("STRING", {"default": "", "multiline": True, "tooltip": "Negative prompt."}),
                "strengths": ("STRING", {"default": "0,0.5,0.75,1", "tooltip": "LoRA strengths, comma-separated: "
                              "one column each (0: the base model, rendered once)."}),
                "seed": ("INT", {"default": 1, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "Same seed for every image."}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 150,
                                  "tooltip": field_help()["sample_steps"]["help"]}),
                "cfg": ("FLOAT", {"default": 7.0, "min": 1.0, "max": 30.0, "step": 0.5,
                                  "tooltip": "Classifier-free guidance scale."}),
                "width": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 8, "tooltip": "Image width."}),
                "height": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 8, "tooltip": "Image height."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, loras: Any = None, run_folder: Any = None, **_: Any) -> str:
        """A run that saved another checkpoint, or a LoRA written again under its name, renders again. Never
        raises (ComfyUI would then run the node on every Run); a linked input arrives as None and adds nothing."""
        digest = hashlib.sha256()
        for kind, line in [("run", x) for x in lines(run_folder)] + [("lora", x) for x in lines(loras)]:
            try:
                if kind == "run":
                    digest.update(folder_fingerprint(str(run_path(line))).encode())
                else:
                    stat = Path(lora_file(line)).stat()
                    digest.update(f"{line}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
            except Exception:  # a name not there (yet): compare() says so
                digest.update(f"missing:{kind}:{line}\0".encode())
        return digest.hexdigest()

    def compare(self, model: Any, clip: Any, vae: Any, loras: str, run_folder: str, prompt: str, negative: str,
                strengths: str, seed: int, steps: int, cfg: float, width: int, height: int) -> dict:
        values = parse_strengths(strengths)
        rows, text = what_to_compare(loras, run_folder)
        images = render_rows(model, clip, vae, rows, values, prompt, negative, seed, steps, cfg, width, height)
        grid = label_grid(images, [f"strength {s:g}" for s in values], [label for label, _ in rows], seed)
        return {"ui": {"text": [text]}, "result": (pil_to_image(grid), text)}


def what_to_compare(loras: str, run_folder: str) -> Tuple[Rows, str]:
    """The grid's rows and the table, from either input; both or neither is refused in one line."""
    names, folders = lines(loras), lines(run_folder)
    if names and folders:
        raise ConfigError("Give loras or run_folder, not both: empty one of them.")
    if folders:
        paths = [run_path(f) for f in folders]
        try:
            comparison = compare_runs(paths)
            runs = [read_run(p) for p in paths]
        except ConfigError as e:
            raise ConfigError(f"run_folder: {e}") from None
        try:
            rows = grid_rows(runs)
        except ConfigError:  # its message names the CLI's --no-grid
            raise ConfigError("run_folder: no finished LoRA or checkpoint in these runs yet: let them finish (or "
                              "resume them with Train LoRA's resume) and run again.") from None
        for _, path in rows:
            if not Path(path).is_file():
                raise ConfigError(f"run_folder: {path} is gone (moved or deleted): put it back, or compare the "
                                  "files that are there with loras.")
        return rows, table(comparison)
    if names:
        paths = [lora_file(n) for n in names]
        return [(Path(p).stem, p) for p in paths], lora_table(paths)
    raise ConfigError("Nothing to compare: list LoRAs in loras (names from models/loras or absolute paths, one per "
                      "line), or give run_folder (a training run's output folder).")


def lines(text: Any) -> List[str]:
    return [line.strip() for line in text.splitlines() if line.strip()] if isinstance(text, str) else []


def run_path(text: str) -> Path:
    """A run folder as typed; a relative one is first looked for where Train LoRA puts its runs."""
    import folder_paths

    path = Path(text).expanduser()
    if not path.is_absolute():
        ours = Path(folder_paths.get_output_directory()) / "lora_trainer" / path
        if ours.is_dir():
            return ours
    return path


def lora_file(name: str) -> str:
    """An absolute path as it is; a name (with or without .safetensors) from ComfyUI's loras folders."""
    import folder_paths

    path = Path(name).expanduser()
    if path.is_absolute():
        if not path.is_file():
            raise ConfigError(f"loras: {name} not found: give an existing LoRA file, or a name from models/loras.")
        return str(path)
    for candidate in (name, f"{name}.safetensors"):
        try:
            return folder_paths.get_full_path_or_raise("loras", candidate)
        except FileNotFoundError:
            continue
    listed = {str(Path(n).with_suffix("")): n for n in folder_paths.get_filename_list("loras")}
    close = difflib.get_close_matches(str(Path(name).with_suffix("")) if name.endswith(".safetensors") else name,
                                      list(listed), n=1)
    hint = f" Did you mean {listed[close[0]]!r}?" if close else ""
    raise ConfigError(f"loras: {name!r} is not in models/loras: write names as LoRA Loader lists them (press R after "
                      f"adding a file), or absolute paths, one per line.{hint}")


def render_rows(model: Any, clip: Any, vae: Any, rows: Rows, strengths: Sequence[float], prompt: str, negative: str,
                seed: int, steps: int, cfg: float, width: int, height: int) -> List[List[Any]]:
    """images[row][strength] (PIL). One LoRA file in memory at a time; strength 0 is the graph's model alone, the
    same picture in every row, so it is rendered once."""
    import nodes

    latent = nodes.EmptyLatentImage().generate(width, height, 1)[0]
    base = None
    images = []
    for _, path in rows:
        lora = load_lora_file(Path(path))
        row = []
        for strength in strengths:
            if strength == 0 and base is not None:
                row.append(base)
                continue
            image = image_to_pil(render(model, clip, vae, lora, strength, prompt, negative, seed, steps, cfg, latent))
            base = image if strength == 0 else base
            row.append(image)
        images.append(row)
        del lora
    return images


def lora_table(paths: Sequence[str]) -> str:
    """Each file's type, rank, alpha and validation loss as its metadata records them (— where it does not)."""
    head = ("lora", "type", "rank", "alpha", "val_loss")
    rows, measured = [head], {}
    for path in paths:
        meta = read_lora(Path(path), with_tensors=False)[1] if path.endswith(".safetensors") else {}
        name, val = Path(path).stem, _number(meta.get("lora_trainer.val_loss"))
        if val is not None:
            measured[name] = val
        rows.append((name, network_type(meta), meta.get("ss_network_dim") or "—",
                     _shown(_number(meta.get("ss_network_alpha")), "g"), _shown(val, ".5g")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    text = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            for row in rows]
    if measured:
        text.append(f"lowest validation loss: {min(measured, key=measured.get)}"
                    + ("" if len(measured) == len(paths) else " (of the files that record one)"))
    else:
        text.append("no file records a validation loss (lora-scripts writes one when the run validates: "
                    "validation_split or validation_dir)")
    return "\n".join(text)


def network_type(meta: Dict[str, str]) -> str:
    """LoRA, DoRA, LoHa, LoKr … from kohya's ss_network_module / ss_network_args (as adapters/export.py writes them)."""
    import json

    module = meta.get("ss_network_module", "")
    if not module:
        return "—"
    if module.startswith("lycoris"):
        try:
            args = json.loads(meta.get("ss_network_args") or "{}")
        except ValueError:
            args = {}
        algo = str(args.get("algo", "lycoris"))
        if algo == "lora" and str(args.get("dora_wd")).lower() == "true":
            return "DoRA"
        return {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}.get(algo, algo)
    return "LoRA" if module.startswith("networks.lora") else module.rsplit(".", 1)[-1]


def _number(text: Any) -> Any:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _shown(value: Any, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)
