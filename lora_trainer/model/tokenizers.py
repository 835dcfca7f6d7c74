"""CLIP tokenizers without the network: derived from the BPE vocabulary an installed package ships.

SD1, SD2 and SDXL all use OpenAI's CLIP BPE (49408 tokens); they differ only in the pad token.
open_clip (and OpenAI's `clip`) ship it as `bpe_simple_vocab_16e6.txt.gz`; ComfyUI ships the
transformers files themselves (`comfy/sd1_tokenizer/`). From either we write `vocab.json` and
`merges.txt` once into the cache folder (atomically) and load them with transformers' CLIPTokenizer.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path

from ..errors import ModelError
from ..files import atomic_write_text

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
_NUM_MERGES = 49152 - 256 - 2  # the CLIP vocabulary: 256 bytes x2 (+</w>), the merges, 2 special tokens
_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def cache_root() -> Path:
    """LORA_TRAINER_CACHE, else ~/.cache/lora_trainer."""
    env = os.environ.get("LORA_TRAINER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lora_trainer"


def tokenizer_dir() -> Path:
    """The folder holding the derived CLIP tokenizer files, written on first use."""
    folder = cache_root() / "clip_tokenizer"
    if not all((folder / name).is_file() for name in _FILES):
        vocab, merges = _vocab_and_merges()
        _write(folder, vocab, merges)
    return folder


def load_clip_tokenizer(pad_token: str, folder: Path | None = None):
    """transformers' CLIPTokenizer (77 tokens) padding with `pad_token`; `folder` defaults to the derived one."""
    from transformers import CLIPTokenizer

    source = folder if folder is not None and (folder / "vocab.json").is_file() else tokenizer_dir()
    return CLIPTokenizer.from_pretrained(str(source), pad_token=pad_token, local_files_only=True)


T5_TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


def load_t5_tokenizer(folder: str | Path):
    """T5's tokenizer (Flux) from a local folder, as ComfyUI and Forge ship it; nothing is downloaded."""
    from transformers import T5TokenizerFast

    path = Path(folder).expanduser() if str(folder or "").strip() else None
    if path is None or not any((path / name).is_file() for name in T5_TOKENIZER_FILES):
        raise ModelError(
            f"Flux needs T5's tokenizer (tokenizer.json or spiece.model){f' and {path} has neither' if path else ''}: "
            "set t5_tokenizer to a folder that holds it, e.g. ComfyUI's comfy/text_encoders/t5_tokenizer or "
            "Forge's backend/huggingface/black-forest-labs/FLUX.1-dev/tokenizer_2.")
    return T5TokenizerFast.from_pretrained(str(path), local_files_only=True)


def _package_file(package: str, *parts: str) -> Path | None:
    """A file inside an installed package, found without importing it (importing open_clip is slow)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location, *parts)
        if path.is_file():
            return path
    return None


def _vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    bpe = _package_file("open_clip", _BPE_NAME) or _package_file("clip", _BPE_NAME)
    if bpe is not None:
        with gzip.open(bpe, "rt", encoding="utf-8") as fh:
            lines = fh.read().split("\n")
        merges = lines[1:_NUM_MERGES + 1]  # line 0 is a header
        symbols = _bytes_to_unicode()
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
        return {token: i for i, token in enumerate(vocab)}, merges
    comfy_vocab = _package_file("comfy", "sd1_tokenizer", "vocab.json")
    if comfy_vocab is not None:
        vocab = json.loads(comfy_vocab.read_text(encoding="utf-8"))
        merges = (comfy_vocab.parent / "merges.txt").read_text(encoding="utf-8").split("\n")
        return vocab, [m for m in merges[1:] if m.strip()]
    raise ModelError(
        "The CLIP tokenizer vocabulary was not found. Install open_clip_torch (pip install open_clip_torch), "
        f"or put the vocab.json and merges.txt of openai/clip-vit-large-patch14 in {cache_root() / 'clip_tokenizer'}."
    )


def _bytes_to_unicode() -> list[str]:
    """CLIP's reversible byte → printable character table, in vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def _write(folder: Path, vocab: dict[str, int], merges: list[str]) -> None:
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {**specials, "model_max_length": 77, "do_lower_case": True, "errors": "replace",
              "tokenizer_class": "CLIPTokenizer"}
    atomic_write_text(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    atomic_write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    atomic_write_text(folder / "special_tokens_map.json", json.dumps(specials, indent=2))
    atomic_write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2))  # last: marks completion
