"""Bake LoRAs into a single-file checkpoint: W' = W + strength · (alpha / rank) · up @ down (LoHa/LoKr: their ΔW,
lycoris.delta).

A DoRA file (a `dora_scale` per module) is baked in as the hosts apply it (dora.py): W' = W + strength ·
(dora_scale · (W + ΔW) / ‖W + ΔW‖ − W), ΔW = (alpha / rank) · up @ down.

The result keeps the base file's own layout and keys (SD1.x, SD2.x, SDXL), so every host loads it
as it loaded the base. Which original-layout key a kohya module lands in is not a table written
here: the project's own LDM → diffusers conversion (diffusers' UNet converter, `text_convert` for
the text encoders) is run once on the base file's key *names*, with a stand-in for each tensor, so
the map is exactly what the loader does. OpenCLIP's fused `in_proj_weight` comes out of that as
three row slices, which is where q/k/v LoRAs land.

The base is streamed: each tensor is read, updated if a LoRA touches it, and written before the next
is read, so the merge holds one tensor (plus the LoRAs) in memory, never the model.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import keymap, lycoris
from .dora import decomposed
from ..errors import ConfigError, ModelError
from .export import SAVE_DTYPES, peft_alpha, read_lora, to_kohya
from ..files import atomic_path

_ST_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
FAMILY_OF_VERSION = (("flux", "flux"), ("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1"), ("stable-diffusion-xl", "sdxl"),
                     ("stable-diffusion-v2", "sd2"), ("stable-diffusion-v1", "sd1"))


@dataclass
class LoraInput:
    """One LoRA file in kohya names, with the strength it is merged at."""
    path: Path
    strength: float
    tensors: Dict[str, torch.Tensor]  # kohya layout: <module>.lora_down.weight / .lora_up.weight / .alpha (/ .dora_scale)
    metadata: Dict[str, str]
    family: Optional[str]  # what the file says it was made for (None: it does not say)

    def modules(self) -> List[str]:
        lora = [k[: -len(".lora_down.weight")] for k in self.tensors if k.endswith(".lora_down.weight")]
        return sorted(lora + lycoris.modules_of(self.tensors))

    def factors(self, module: str) -> Tuple[torch.Tensor, torch.Tensor, float]:
        """(up, down, strength · alpha / rank) of one LoRA module, in float32."""
        up, down, alpha = self._parts(module)
        return up, down, self.strength * alpha / down.shape[0]

    def delta(self, module: str) -> torch.Tensor:
        """ΔW of one module at strength 1, flattened to (out, in·k·k): alpha / rank · up @ down, or a LoHa/LoKr's
        (lycoris.delta)."""
        parts = lycoris.module_parts(self.tensors, module)
        if parts:
            alpha = self.tensors.get(f"{module}.alpha")
            return lycoris.delta(parts, None if alpha is None else float(alpha))
        up, down, alpha = self._parts(module)
        return alpha / down.shape[0] * torch.mm(up.flatten(1), down.flatten(1))

    def shape(self, module: str) -> Tuple[int, int]:
        """(out, in·k·k) of the module's ΔW, from the tensors' shapes."""
        parts = lycoris.module_parts(self.tensors, module)
        if parts:
            return lycoris.delta_shape(parts)
        up, down, _ = self._parts(module)
        return up.shape[0], down.flatten(1).shape[1]

    def merged_into(self, module: str, weight: torch.Tensor) -> torch.Tensor:
        """`weight` (float32: a module's weight, or its rows of a fused one) with this module merged in."""
        delta = self.delta(module).reshape(weight.shape)
        dora_scale = self.tensors.get(f"{module}.dora_scale")
        if dora_scale is None:
            return weight + self.strength * delta
        return decomposed(weight, delta, dora_scale.float(), self.strength)

    def _parts(self, module: str) -> Tuple[torch.Tensor, torch.Tensor, float]:
        down = self.tensors[f"{module}.lora_down.weight"].float()
        up = self.tensors[f"{module}.lora_up.weight"].float()
        return up, down, float(self.tensors.get(f"{module}.alpha", torch.tensor(float(down.shape[0]))))


def parse_lora_arg(text: str) -> Tuple[Path, float]:
    """`FILE[:STRENGTH]` → (path, strength); a tail that is no number stays part of the path."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(text), 1.0


def lora_family(metadata: Dict[str, str], tensors: Dict[str, torch.Tensor]) -> Optional[str]:
    """The family a LoRA file says it is for (metadata first, then SDXL-only key names), else None."""
    said = (metadata.get("ss_base_model_version") or metadata.get("modelspec.architecture") or "").lower()
    for word, family in FAMILY_OF_VERSION:
        if said.startswith(word):
            return family
    return keymap.family_of_keys(tensors)


def load_lora(path: Path, strength: float, family: Optional[str], unet_config: object = None) -> LoraInput:
    """Read a LoRA in any spelling `convert` reads into kohya names; anything it cannot use is an error."""
    tensors, metadata = read_lora(path)
    unknown = sorted(k for k in tensors if keymap.split_lora_key(k) is None)
    if unknown:
        raise ModelError(f"{path.name} holds {len(unknown)} tensors that are not LoRA, DoRA, LoHa or LoKr weights "
                         f"(e.g. {unknown[0]}): other LyCORIS types (IA3, GLoRA, OFT, full diff) cannot be merged.")
    own = lora_family(metadata, tensors)
    family = own or family or "sd1"  # converted in its own family; a mismatch with the base is reported later
    kohya = to_kohya(tensors, family, 2 if family == "sdxl" else 1, default_alpha=peft_alpha(path),
                     unet_config=unet_config)
    modules = {keymap.split_lora_key(k)[0] for k in tensors}
    lora = LoraInput(path, strength, kohya, metadata, own)
    if len(lora.modules()) < len(modules):
        raise ModelError(f"{path.name}: some LoRA modules have no kohya name or lack their up or down weight; "
                         "the file cannot be merged whole.")
    return lora


def file_hash(path: Path) -> str:
    """sha256 of the bytes after the safetensors header: the `sshs_model_hash` A1111 shows for a LoRA."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        (header,) = struct.unpack("<Q", fh.read(8))
        fh.seek(8 + header)
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def refuse_existing(path: Path) -> None:
    if Path(path).exists():
        raise ConfigError(f"{path} already exists and is never overwritten: give another --output.")


# -- where each kohya module lives in the base file -------------------------------------------------

class _Slot:
    """Stands in for a tensor while the loader's conversion runs on names: remembers the key and slice."""

    def __init__(self, key: str, part: Optional[Tuple[int, int]] = None) -> None:
        self.key, self.part = key, part

    def chunk(self, n: int, dim: int = 0) -> List[_Slot]:
        return [_Slot(self.key, (i, n)) for i in range(n)]

    def t(self) -> _Slot:
        return _Slot(self.key, None)

    def clone(self) -> _Slot:
        return self


def module_map(keys: Sequence[str], family: str, configs: dict) -> Dict[str, Tuple[str, Optional[Tuple[int, int]]]]:
    """kohya module name → (base file key of its weight, row slice (i, n) of a fused weight or None)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from ..model.detect import TEXT_ENCODERS, UNET_PREFIX
    from ..model.shipped import text_encoder_parts
    from ..model.text_convert import clip_l_from_ldm, open_clip_from_ldm

    def plain(key: str) -> str:  # A1111 wraps its text encoders (`cond_stage_model.wrapped.…`)
        return key.replace(".wrapped.", ".", 1) if key.startswith(("cond_stage_model.", "conditioner.")) else key

    slots = {plain(k): _Slot(k) for k in keys}
    out: Dict[str, Tuple[str, Optional[Tuple[int, int]]]] = {}
    unet = convert_ldm_unet_checkpoint({k: v for k, v in slots.items() if k.startswith(UNET_PREFIX)},
                                       configs["unet"])
    parts = [(keymap.UNET_PREFIX, unet)]
    te_prefixes = keymap.text_encoder_prefixes(family, len(TEXT_ENCODERS[family]))
    for te_prefix, part, (prefix, layout) in zip(te_prefixes, text_encoder_parts(family), TEXT_ENCODERS[family]):
        if layout == "clip_l":
            hf = clip_l_from_ldm(slots, prefix)
        else:
            hf = open_clip_from_ldm(slots, prefix, configs[part]["num_hidden_layers"], False)
        parts.append((te_prefix, hf))
    for prefix, converted in parts:
        for name, slot in converted.items():
            if name.endswith(".weight") and isinstance(slot, _Slot):
                out[keymap.kohya_name(prefix, name[: -len(".weight")])] = (slot.key, slot.part)
    return out


def flux_module_map(keys: Sequence[str]) -> Dict[str, Tuple[str, Optional[Tuple[int, int]]]]:
    """kohya module name → (base file key, None) of a Flux.1 file: its LoRAs are written on the original fused
    modules (flux_layout.py), so each names one weight of the file as it is (bare or all-in-one, whose CLIP-L
    is `lora_te1_`)."""
    from ..model.flux import EMBEDDED, PREFIX

    clip = EMBEDDED["clip_l"]
    out: Dict[str, Tuple[str, Optional[Tuple[int, int]]]] = {}
    for key in keys:
        if not key.endswith(".weight"):
            continue
        name = key[: -len(".weight")]
        if name.startswith(clip):
            out[keymap.kohya_name("lora_te1", name[len(clip):].removeprefix("transformer."))] = (key, None)
        elif not name.startswith(("text_encoders.", "vae.")):
            out[keymap.kohya_name(keymap.UNET_PREFIX, name.removeprefix(PREFIX))] = (key, None)
    return out


# -- the merge ------------------------------------------------------------------------------------

def merge_into_checkpoint(base_path: Path, loras: Sequence[Tuple[Path, float]], output: Path,
                          precision: Optional[str] = None) -> Path:
    """Write `output`: the base checkpoint with every LoRA baked in, in the base's own layout and keys."""
    from ..model.checkpoint_file import CheckpointFile
    from ..model.detect import detect_family
    from ..model.flux import is_flux
    from ..model.shipped import a_family, load_configs
    from ..model.single_file import select_variant

    base_path, output = Path(base_path), Path(output)
    refuse_existing(output)
    if not base_path.is_file():
        raise ModelError(f"Base checkpoint not found: {base_path}")
    if base_path.suffix.lower() != ".safetensors":
        raise ModelError(f"{base_path.name}: merge reads .safetensors checkpoints only (it streams them tensor "
                         "by tensor); convert a .ckpt to .safetensors first.")
    base = CheckpointFile(base_path)
    if is_flux(base):
        family, unet_config = "flux", None
        where = flux_module_map(list(base))
    else:
        family = detect_family(list(base))
        configs = load_configs(family, select_variant(family, base))  # reads the UNet's input conv only
        where = module_map(list(base), family, configs)
        unet_config = SimpleNamespace(layers_per_block=configs["unet"]["layers_per_block"])
    inputs = []
    for path, strength in loras:
        lora = load_lora(Path(path), strength, family, unet_config)
        if lora.family and lora.family != family:
            raise ModelError(f"{lora.path.name} is {a_family(lora.family)} LoRA and {base_path.name} is "
                             f"{a_family(family)} checkpoint: merge LoRAs made for the base's family.")
        missing = [m for m in lora.modules() if m not in where]
        if missing:
            raise ModelError(f"{lora.path.name}: {len(missing)} LoRA modules match nothing in {base_path.name} "
                             f"({', '.join(missing[:8])}{', …' if len(missing) > 8 else ''}); nothing was written. "
                             "Is the LoRA for another model?")
        inputs.append(lora)
    updates: Dict[str, List[Tuple[LoraInput, str, Optional[Tuple[int, int]]]]] = {}
    for lora in inputs:
        for module in lora.modules():
            key, part = where[module]
            updates.setdefault(key, []).append((lora, module, part))
    _check_shapes(base, updates)

    def produce(key: str) -> torch.Tensor:
        target = SAVE_DTYPES[precision] if precision else None
        if key not in updates:
            return base.read(key, target)
        weight = base.read(key, torch.float32)
        for lora, module, part in updates[key]:
            rows = _rows(weight, part)
            rows.copy_(lora.merged_into(module, rows))
        return weight.to(target or _torch_dtype(base.stored_dtype(key)))

    stale = ("modelspec.hash_sha256", "sshs_model_hash")  # hashes of the base's own bytes
    metadata = {k: v for k, v in base.metadata.items() if k not in stale}
    metadata["lora_trainer.merged_loras"] = json.dumps(
        [{"file": x.path.name, "sshs_model_hash": file_hash(x.path), "strength": x.strength,
          "ss_output_name": x.metadata.get("ss_output_name", x.path.stem)} for x in inputs])
    with atomic_path(output) as tmp:
        write_streamed(tmp, base, produce, metadata, precision)
    return output


def _rows(weight: torch.Tensor, part: Optional[Tuple[int, int]]) -> torch.Tensor:
    if part is None:
        return weight
    i, n = part
    size = weight.shape[0] // n
    return weight[i * size:(i + 1) * size]


def _check_shapes(base, updates) -> None:
    """Every update must fit its weight before anything is written (a wrong LoRA is never half merged)."""
    for key, entries in updates.items():
        shape = base.shape(key)
        for lora, module, part in entries:
            rows = shape[0] // part[1] if part else shape[0]
            numel = rows * (torch.Size(shape[1:]).numel() if len(shape) > 1 else 1)
            out, columns = lora.shape(module)
            if out != rows or out * columns != numel or not _dora_fits(lora, module, rows, numel // rows):
                raise ModelError(f"{lora.path.name}: {module} (an update of {out} × {columns}) does not fit {key} "
                                 f"{shape}: the LoRA was made for another model.")


def _dora_fits(lora: LoraInput, module: str, rows: int, columns: int) -> bool:
    """A dora_scale holds one value per output row ((rows, 1, …)) or per input channel ((1, in, …))."""
    scale = lora.tensors.get(f"{module}.dora_scale")
    if scale is None:
        return True
    down = lora.tensors.get(f"{module}.lora_down.weight")
    kernel = lycoris.kernel(module, lycoris.module_parts(lora.tensors, module)) if down is None else None
    channels = down.shape[1] if down is not None else columns // (kernel[0] * kernel[1]) if kernel else columns
    return scale.numel() == rows and scale.shape[0] == rows or scale.shape[0] == 1 and scale.numel() == channels


def _torch_dtype(name: str) -> torch.dtype:
    from ..model.checkpoint_file import safetensors_dtypes

    return safetensors_dtypes()[name]


def write_streamed(path: Path, base, produce, metadata: Dict[str, str], precision: Optional[str]) -> None:
    """A safetensors file with `base`'s keys and shapes, each tensor `produce(key)`, written one at a time.

    The header is known before any tensor is read (shapes from the base, dtypes from `precision`), so
    nothing but the tensor being written is ever held.
    """
    keys = list(base)
    header: Dict[str, object] = {}
    offset = 0
    for key in keys:
        stored = base.stored_dtype(key)
        is_float = stored in ("F64", "F32", "F16", "BF16") or stored.startswith("F8")
        name = _ST_NAMES[SAVE_DTYPES[precision]] if precision and is_float else stored
        size = torch.empty((), dtype=_torch_dtype(name)).element_size() * torch.Size(base.shape(key)).numel()
        header[key] = {"dtype": name, "shape": list(base.shape(key)), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(blob)) + blob)
        for key in keys:
            tensor = produce(key).contiguous()
            entry = header[key]
            if _ST_NAMES.get(tensor.dtype, entry["dtype"]) != entry["dtype"] or list(tensor.shape) != entry["shape"]:
                raise ModelError(f"internal: {key} came out as {tensor.dtype} {tuple(tensor.shape)}")
            if tensor.numel():
                out.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            del tensor
