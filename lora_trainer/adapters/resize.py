"""LoRA → LoRA: several merged into one (`merge` without `--base`), and `resize` to a lower rank by SVD.

Merging without a base is exact by stacking: for module m, LoRA i contributes
s_i · (alpha_i / r_i) · up_i @ down_i, and [up_1·c_1 | up_2·c_2 …] @ [down_1; down_2; …] is their sum, so the
stacked file has rank Σ r_i and alpha = rank (scale 1, the strengths and alphas folded into the up weights).
With a target rank the summed update of each module is factored by SVD instead.

`resize` follows kohya's resize semantics: the SVD is of up @ down (convs flattened, the 3x3 kernel staying in
down), the new down is Vh[:R], the new up U[:, :R]·S[:R], and alpha is rescaled to keep alpha/rank, so the
update keeps its scale: alpha' = alpha · R / rank. A host (and this project's read path) then applies
alpha'/R · up' @ down' = alpha/rank · (the best rank-R approximation of up @ down).

DoRA files (dora.py): `resize` keeps each module's dora_scale (in fp32, either axis) and resizes the direction update ΔW, which a host
then normalises as before. Merging them without a base is refused: a magnitude rescales W + ΔW as a whole, so
several DoRA (or DoRA and plain) updates do not add up to one file without the base weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import ConfigError, ModelError
from .export import ARCHITECTURE, BASE_MODEL_VERSION, SAVE_DTYPES, dora_on_output, is_dora, network_metadata, save_lora
from . import lycoris
from .merge import LoraInput, file_hash, load_lora, refuse_existing


@dataclass
class Kept:
    """One row of the resize table."""
    module: str
    old_rank: int
    new_rank: int
    fraction: float  # Frobenius norm of the kept update / that of the whole update


def parse_dynamic(text: str) -> float:
    """`sv_fro:0.9` → 0.9 (the share of the update's Frobenius norm to keep)."""
    method, _, value = text.partition(":")
    try:
        share = float(value)
    except ValueError:
        share = -1.0
    if method != "sv_fro" or not 0 < share <= 1:
        raise ConfigError(f"--dynamic {text!r}: give sv_fro:X with 0 < X <= 1 (the share of each module's "
                          "Frobenius norm to keep), e.g. sv_fro:0.9.")
    return share


def _factor(delta: torch.Tensor, rank: Optional[int], fro: Optional[float]) -> Tuple[torch.Tensor, torch.Tensor,
                                                                                      int, float]:
    """(U·S, Vh) of the best approximation of the 2-D `delta` at `rank`, or at the smallest rank whose
    Frobenius share reaches `fro`; and that rank and the share it keeps."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    energy = (s ** 2).cumsum(0)
    total = float(energy[-1])
    if rank is None:
        share = (energy / total).sqrt() if total > 0 else torch.ones_like(s)
        rank = int((share < fro - 1e-12).sum()) + 1
    keep = max(1, min(rank, int(s.numel())))
    fraction = (float(energy[keep - 1]) / total) ** 0.5 if total > 0 else 1.0
    return (u[:, :keep] * s[:keep]).float(), vh[:keep].float(), keep, fraction


def _shaped(up: torch.Tensor, down: torch.Tensor, kernel: Optional[tuple]):
    """Give 2-D factors a conv LoRA's layout where the module is a k×k conv (k×k down, 1×1 up)."""
    if kernel is None:
        return up, down
    return (up.reshape(up.shape[0], up.shape[1], 1, 1),
            down.reshape(down.shape[0], down.shape[1] // (kernel[0] * kernel[1]), *kernel))


def _kernel(lora: LoraInput, module: str) -> Optional[tuple]:
    down = lora.tensors.get(f"{module}.lora_down.weight")
    if down is not None:
        return tuple(down.shape[2:]) if down.dim() == 4 else None
    return lycoris.kernel(module, lycoris.module_parts(lora.tensors, module))


def resize_lora(tensors: Dict[str, torch.Tensor], rank: Optional[int] = None,
                fro: Optional[float] = None) -> Tuple[Dict[str, torch.Tensor], List[Kept]]:
    """A kohya-layout LoRA at `rank` (never above a module's own) or by `fro` share; the table of what was kept.
    A LoHa/LoKr module becomes a LoRA one: the SVD of its ΔW (lycoris.delta), alpha = the new rank (scale 1)."""
    out: Dict[str, torch.Tensor] = {}
    table: List[Kept] = []
    source = LoraInput(Path("-"), 1.0, tensors, {}, None)
    for module in source.modules():
        if lycoris.module_parts(tensors, module):
            delta = source.delta(module)
            new_up, new_down, new, fraction = _factor(delta, rank, fro)
            old, alpha = min(delta.shape), float(new)
        else:
            down, up = tensors[f"{module}.lora_down.weight"].float(), tensors[f"{module}.lora_up.weight"].float()
            old = down.shape[0]
            new_up, new_down, new, fraction = _factor(up.flatten(1) @ down.flatten(1), rank, fro)
            alpha = float(tensors.get(f"{module}.alpha", torch.tensor(float(old)))) * new / old
        new_up, new_down = _shaped(new_up, new_down, _kernel(source, module))
        out[f"{module}.lora_down.weight"] = new_down
        out[f"{module}.lora_up.weight"] = new_up
        out[f"{module}.alpha"] = torch.tensor(alpha)
        if f"{module}.dora_scale" in tensors:
            out[f"{module}.dora_scale"] = tensors[f"{module}.dora_scale"].float()
        table.append(Kept(module, old, new, fraction))
    if not table:
        raise ModelError("No LoRA modules found to resize.")
    return out, table


def merge_loras(loras: Sequence[LoraInput], rank: Optional[int] = None) -> Tuple[Dict[str, torch.Tensor], List[Kept]]:
    """One kohya LoRA whose update is Σ s_i · alpha_i/r_i · up_i @ down_i per module: stacked (exact) or, with
    `rank`, the SVD of each module's summed update (the table says how much of it was kept)."""
    dora = [lora.path.name for lora in loras if is_dora(lora.tensors)]
    if dora:
        raise ModelError(f"{dora[0]} is a DoRA file: its magnitudes rescale the base weight as a whole, so it cannot "
                         "be merged into another LoRA without the base. Merge it into a checkpoint (--base) instead.")
    lyco = [lora.path.name for lora in loras if lycoris.modules_of(lora.tensors)]
    if lyco and rank is None:
        raise ModelError(f"{lyco[0]} is a LoHa/LoKr file: merged with LoRAs it becomes a LoRA of a rank you choose "
                         "(the SVD of the summed update): add --rank N, e.g. --rank 32.")
    modules: Dict[str, List[LoraInput]] = {}
    for lora in loras:
        for module in lora.modules():
            modules.setdefault(module, []).append(lora)
    out: Dict[str, torch.Tensor] = {}
    table: List[Kept] = []
    for module, sources in sorted(modules.items()):
        shapes = {lora.shape(module) for lora in sources}
        kernels = {_kernel(lora, module) for lora in sources}
        if len(shapes) > 1 or len(kernels) > 1:
            raise ModelError(f"{module}: the LoRAs disagree on its shape ({sorted(shapes)}); they were made for "
                             "different models.")
        if rank is None:
            parts = [lora.factors(module) for lora in sources]
            up = torch.cat([u * c for u, _, c in parts], dim=1)
            down = torch.cat([d for _, d, _ in parts], dim=0)
            kept = Kept(module, up.shape[1], up.shape[1], 1.0)
        else:
            delta = sum(lora.strength * lora.delta(module) for lora in sources)
            up, down, new, fraction = _factor(delta, rank, None)
            up, down = _shaped(up, down, kernels.pop())
            kept = Kept(module, sum(_rank_of(lora, module) for lora in sources), new, fraction)
        out[f"{module}.lora_down.weight"] = down
        out[f"{module}.lora_up.weight"] = up
        out[f"{module}.alpha"] = torch.tensor(float(down.shape[0]))  # scale 1: strengths and alphas are in `up`
        table.append(kept)
    return out, table


def _rank_of(lora: LoraInput, module: str) -> int:
    down = lora.tensors.get(f"{module}.lora_down.weight")
    return down.shape[0] if down is not None else min(lora.shape(module))  # a LoHa/LoKr: its update's full rank


def format_table(table: Sequence[Kept]) -> str:
    width = max(len("module"), *(len(r.module) for r in table))
    lines = [f"{'module':<{width}}  old rank  new rank  kept (Frobenius)"]
    lines += [f"{r.module:<{width}}  {r.old_rank:>8}  {r.new_rank:>8}  {r.fraction:>15.4f}" for r in table]
    worst = min(table, key=lambda r: r.fraction)
    lines.append(f"{len(table)} modules; least kept: {worst.fraction:.4f} ({worst.module})")
    return "\n".join(lines)


def _common_family(loras: Sequence[LoraInput]) -> str:
    said = {lora.family for lora in loras if lora.family}
    if len(said) > 1:
        names = ", ".join(f"{lora.path.name} ({lora.family})" for lora in loras if lora.family)
        raise ModelError(f"These LoRAs are for different model families: {names}; merge LoRAs of one family.")
    return said.pop() if said else "sd1"


def _metadata(family: str, name: str, table: Sequence[Kept], base: Dict[str, str],
              dora: bool = False, on_output: bool = False) -> Dict[str, str]:
    """kohya/modelspec keys for a new LoRA file: `base`'s (a resize keeps its input's training record; a merge
    passes only what says which model the LoRAs are for), the ranks and alphas of the new file."""
    ranks = sorted({r.new_rank for r in table})
    meta = {k: v for k, v in base.items() if k.startswith(("ss_", "modelspec."))}
    meta.update(network_metadata(dora, on_output=on_output))  # conv_dim/conv_alpha of the old file no longer hold
    if family == "flux":
        meta["ss_network_module"] = "networks.lora_flux"
    meta.update({
        "ss_output_name": name, "modelspec.title": name,
        "ss_base_model_version": base.get("ss_base_model_version", BASE_MODEL_VERSION[family]),
        "ss_v2": str(family == "sd2"),
        "ss_network_dim": str(ranks[0]) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": str(ranks[0]) if len(ranks) == 1 else "Dynamic",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": base.get("modelspec.architecture",
                                           ARCHITECTURE.get((family, "epsilon"), ARCHITECTURE.get((family, "dev")))),
    })
    return meta


def merge_lora_files(loras: Sequence[Tuple[Path, float]], output: Path, rank: Optional[int] = None,
                     precision: str = "fp16") -> Tuple[Path, List[Kept]]:
    """`merge` without a base: the LoRAs' summed update as one kohya-layout file."""
    refuse_existing(output)
    inputs = [load_lora(Path(p), s, None) for p, s in loras]
    family = _common_family(inputs)
    tensors, table = merge_loras(inputs, rank)
    which_model = ("ss_base_model_version", "ss_v2", "ss_sd_model_name", "ss_resolution", "modelspec.architecture",
                   "modelspec.resolution", "modelspec.prediction_type", "modelspec.implementation")
    meta = _metadata(family, Path(output).stem, table,
                     {k: v for k, v in inputs[0].metadata.items() if k in which_model})
    meta["lora_trainer.merged_loras"] = json.dumps(
        [{"file": x.path.name, "sshs_model_hash": file_hash(x.path), "strength": x.strength} for x in inputs])
    meta["lora_trainer.merge_method"] = "stacked ranks (exact)" if rank is None else f"svd rank {rank}"
    dtype = SAVE_DTYPES[precision]
    return save_lora(Path(output), {k: v.to(dtype).contiguous() for k, v in tensors.items()}, meta), table


def resize_lora_file(path: Path, output: Path, rank: Optional[int] = None, fro: Optional[float] = None,
                     precision: str = "fp16") -> Tuple[Path, List[Kept]]:
    """`resize`: one LoRA at a lower rank (or by Frobenius share), alpha keeping the update's scale."""
    refuse_existing(output)
    lora = load_lora(Path(path), 1.0, None)
    tensors, table = resize_lora(lora.tensors, rank, fro)
    family = lora.family or "sd1"
    meta = _metadata(family, Path(output).stem, table, lora.metadata, is_dora(tensors), dora_on_output(tensors))
    alphas = {round(float(v), 6) for k, v in tensors.items() if k.endswith(".alpha")}
    meta["ss_network_alpha"] = str(alphas.pop()) if len(alphas) == 1 else "Dynamic"
    meta["lora_trainer.resized_from"] = json.dumps({"file": Path(path).name, "sshs_model_hash": file_hash(Path(path)),
                                                    "rank": rank, "sv_fro": fro})
    dtype = SAVE_DTYPES[precision]  # DoRA magnitudes stay fp32, as the trainer saves them (export.lora_state_dict)
    return save_lora(Path(output), {k: v.to(torch.float32 if k.endswith(".dora_scale") else dtype).contiguous()
                                    for k, v in tensors.items()}, meta), table
