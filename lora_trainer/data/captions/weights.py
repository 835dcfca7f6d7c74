"""Finding the captioner's weights without the network.

open_clip's pretrained registry (`open_clip.pretrained.get_pretrained_cfg`) says which Hugging Face
repo a (model, tag) pair downloads from. We look for that file, in order:

1. `pretrained` is a path: that file (`.safetensors`, `.bin`, `.pt`, `.pth`), or the weights file
   inside that folder (a downloaded Hugging Face repo folder works);
2. the weights folder, `<cache_root>/captioner/<model>/<tag>/` (`LORA_TRAINER_CACHE`, else
   `~/.cache/lora_trainer`): drop the downloaded file there and it is found;
3. the Hugging Face cache (where open_clip itself and `huggingface-cli download` put it), read
   with `huggingface_hub.try_to_load_from_cache`, which never touches the network;
4. only when the caller allows it (`allow_download`, CLI `--download`): a download into that cache.

When none has it, `MissingWeights` (a `CaptionError`) says in one line which file to download, from
where, and where to put it — in the CLI's words by default; a front end re-words it with
`e.in_words(folder, field)` (the host's weights folder, the name of its weights field).
`available_weights` lists the weight files a front end can offer in a picker. Nothing here waits on
the network unless a download was asked for.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

from ...errors import CaptionError
from ...model.tokenizers import cache_root

# What open_clip looks for in a repo named without a file name, best first (3.x prefers safetensors).
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class WeightsFile:
    path: Path
    key: str  # names these weights in caches: "<model>/<tag>", or the file's name, size and time


class MissingWeights(CaptionError):
    """The captioner's weights are not on this machine; says what to download and where to put it."""

    def __init__(self, model: str, pretrained: str, folder: Path | None, url: str, error: str = "") -> None:
        self.model, self.pretrained, self.folder, self.url, self.error = model, pretrained, folder, url, error
        super().__init__(self.in_words())

    def in_words(self, folder: str | os.PathLike[str] | None = None, field: str = "", option: str = "--pretrained",
                 download_option: str = "--download") -> str:
        """The message for a front end: `folder` where its users drop weights, `field` its weights picker
        ("" = a command line: its weights `option`, and its `download_option`, "" when it has none)."""
        failed = f" (download failed: {self.error[:120]})" if self.error else ""
        head = f"Captioner weights for {self.model} ({self.pretrained}) are not on this machine{failed}. "
        if field:
            where = Path(folder) if folder else (self.folder or weights_dir())
            return f"{head}Download {self.url}, put it in {where}{os.sep} and pick it in \"{field}\"."
        if self.folder is None:  # not on the Hugging Face hub: only a file path will do
            return f"{head}Download {self.url} and pass it with {option} PATH."
        online = f", or run once online with {download_option}" if download_option else ""
        return f"{head}Download {self.url} and put it in {self.folder}{os.sep} (or pass {option} PATH){online}."


def available_weights(model: str, pretrained: str = "", extra_dirs: tuple = ()) -> list[Path]:
    """Weight files a picker can offer for `model`: every weights file under `extra_dirs` (a host's
    models folder) and under the weights folder, then the file the Hugging Face cache holds for the
    `pretrained` tag. Nothing is downloaded."""
    found: list[Path] = []
    for root in [*(Path(d).expanduser() for d in extra_dirs if d), weights_dir() / model]:
        if root.is_dir():
            found += sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES)
    if pretrained and is_known_tag(model, pretrained):
        repo, names, _ = hub_source(model, clean_tag(pretrained))
        cached = _from_hf_cache(repo, names, None)
        if cached is not None:
            found.append(cached)
    return list(dict.fromkeys(found))


def clean_tag(tag: str) -> str:
    """open_clip's spelling of a pretrained tag: `mscoco_finetuned_laion2B-s13B-b90k` → `..._laion2b_s13b_b90k`."""
    return tag.strip().lower().replace("-", "_")


def weights_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Where a user may drop captioner weights: `override`, else `<cache_root>/captioner`."""
    return Path(override).expanduser() if override else cache_root() / "captioner"


def hub_source(model: str, tag: str) -> tuple[str, tuple[str, ...], str]:
    """(Hugging Face repo, candidate file names, direct URL) of an open_clip pretrained tag; repo '' when unknown."""
    from open_clip.pretrained import get_pretrained_cfg

    cfg = get_pretrained_cfg(model, clean_tag(tag)) or {}
    hub = cfg.get("hf_hub", "")
    if hub:
        repo, filename = posixpath.split(hub)  # open_clip's rule: "org/name/" means its default file names
        names = (filename,) if filename else WEIGHT_FILES
        if filename.endswith((".bin", ".pth")):
            names = (filename[:-4] + ".safetensors", filename)
        return repo, names, f"https://huggingface.co/{repo}/resolve/main/{names[-1]}"
    return "", (), cfg.get("url", "")


def is_known_tag(model: str, tag: str) -> bool:
    from open_clip.pretrained import get_pretrained_cfg

    return bool(get_pretrained_cfg(model, clean_tag(tag)))


def find_weights(model: str, pretrained: str, own_dir: str | os.PathLike[str] | None = None,
                 hf_cache_dir: str | os.PathLike[str] | None = None, allow_download: bool = False) -> WeightsFile:
    """The local weights file for `model`: see the module docstring for where it looks."""
    pretrained = (pretrained or "").strip()
    if not pretrained:
        raise CaptionError(f"No captioner weights given for {model}: pass --pretrained PATH (a weights file) "
                           "or an open_clip pretrained tag.")
    path = Path(pretrained).expanduser()
    looks_like_path = path.suffix.lower() in WEIGHT_SUFFIXES or os.sep in pretrained or "/" in pretrained
    if path.exists() or (looks_like_path and not is_known_tag(model, pretrained)):
        return _explicit_file(model, path)
    if not is_known_tag(model, pretrained):
        raise CaptionError(
            f"{pretrained!r} is neither a weights file nor an open_clip pretrained tag of {model}. "
            "Pass --pretrained PATH to a .safetensors/.bin file, or a tag such as mscoco_finetuned_laion2B-s13B-b90k.")
    tag = clean_tag(pretrained)
    key = f"{model}/{tag}"
    folder = weights_dir(own_dir) / model / tag
    repo, names, url = hub_source(model, tag)
    for name in names:
        if (folder / name).is_file():
            return WeightsFile(folder / name, key)
    cached = _from_hf_cache(repo, names, hf_cache_dir)
    if cached is not None:
        return WeightsFile(cached, key)
    last_error = ""
    if allow_download and repo:
        downloaded, last_error = _download(repo, names, hf_cache_dir)
        if downloaded is not None:
            return WeightsFile(downloaded, key)
    raise MissingWeights(model, pretrained, folder if repo else None, url, last_error)


def _explicit_file(model: str, path: Path) -> WeightsFile:
    if path.is_dir():
        found = [path / n for n in WEIGHT_FILES if (path / n).is_file()]
        found = found or sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES)
        if not found:
            raise CaptionError(f"No weights file ({', '.join(WEIGHT_FILES)}) in the folder {path}.")
        path = found[0]
    if not path.is_file():
        raise CaptionError(f"Captioner weights file not found: {path}. Check the --pretrained path.")
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise CaptionError(f"{path.name} is not a weights file: use a .safetensors, .bin, .pt or .pth file of {model}.")
    stat = path.stat()
    return WeightsFile(path, f"{model}/file:{path.name}:{stat.st_size}:{stat.st_mtime_ns}")


def _from_hf_cache(repo: str, names: tuple[str, ...], cache_dir) -> Path | None:
    if not repo:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for name in names:
        try:
            found = try_to_load_from_cache(repo, name, cache_dir=str(cache_dir) if cache_dir else None)
        except Exception:  # noqa: BLE001 - a malformed cache is the same as no cache here
            found = None
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def _download(repo: str, names: tuple[str, ...], cache_dir) -> tuple[Path | None, str]:
    """Try each candidate file; (path, '') on success, else (None, the last error's first line)."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        return None, "huggingface_hub is not installed"
    error = ""
    for name in names:
        try:
            return Path(hf_hub_download(repo, name, cache_dir=str(cache_dir) if cache_dir else None)), ""
        except Exception as e:  # noqa: BLE001 - offline, missing file, HTTP errors: all end in the same message
            error = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return None, error
