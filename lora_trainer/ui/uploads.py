"""Images from the browser: uploaded files and zips copied into the Image folder (a WebUI often runs on
another machine than the browser, so the folder cannot be filled by hand).

Only images and caption files are taken, flat: a zip member is taken by its base name alone, so no
path inside a zip can leave the Image folder. Each image is decoded completely first, with the check
training makes (`images.load_image`); one that cannot be read is reported and not added. Nothing in
the folder is overwritten: a taken image name gets -v2, -v3, ... (`files.unused_path`) and its caption
file follows it; a caption file or metadata file whose name is taken is reported and left out.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Tuple

from ..errors import ConfigError, DatasetError
from ..files import atomic_write_with, unused_path
from ..data.images import IMAGE_EXTENSIONS, ImageLoadError, load_image

CAPTION_SUFFIXES = (".txt",)
METADATA_NAMES = ("metadata.csv", "metadata.jsonl")
UPLOAD_TYPES = [*IMAGE_EXTENSIONS, *CAPTION_SUFFIXES, ".csv", ".jsonl", ".zip"]  # what the file picker offers
MAX_MEMBER_BYTES = 512 * 1024 * 1024  # a zip member larger than this is no training image (zip bombs)
SHOWN = 5


class _Refused(Exception):
    """An uploaded file left out; the message is the reason shown."""


@dataclass
class Added:
    folder: Path
    added: List[str] = field(default_factory=list)  # names written into the folder
    refused: List[Tuple[str, str]] = field(default_factory=list)  # (uploaded name, why it was not added)

    def summary(self) -> str:
        lines = [f"Added {len(self.added)} file(s) to {self.folder}" + (": " + _names(self.added) if self.added else ".")]
        if self.refused:
            lines.append(f"Not added ({len(self.refused)}): " + _names([f"{n} ({why})" for n, why in self.refused]))
        return "\n".join(lines)


def _names(items: List[str]) -> str:
    more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return "; ".join(items[:SHOWN]) + more


def upload_paths(files: Any) -> List[Tuple[str, Path]]:
    """(name as uploaded, file on this machine) for a gr.File value: a list of str paths under gradio 4
    (NamedString), of tempfile wrappers with .name (the copy) and .orig_name under gradio 3."""
    if files is None:
        return []
    out = []
    for f in files if isinstance(files, (list, tuple)) else [files]:
        path = getattr(f, "name", None) or str(f)
        original = str(getattr(f, "orig_name", None) or path)
        out.append((_base_name(original), Path(str(path))))
    return out


def add_files(folder: str, uploads: List[Tuple[str, Path]]) -> Added:
    """Copy `uploads` ((name, path) pairs; zips are unpacked) into the Image folder, creating it if needed."""
    text = str(folder or "").strip()
    if not text:
        raise ConfigError("Pick the Image folder first: added files are copied into it.")
    dest = Path(text).expanduser()
    if dest.exists() and not dest.is_dir():
        raise DatasetError(f"Image folder {dest} is a file, not a folder.")
    dest.mkdir(parents=True, exist_ok=True)
    result = Added(dest)
    with tempfile.TemporaryDirectory(prefix="lora_trainer_upload_") as tmp:
        items: List[Tuple[str, Path, str]] = []  # (name, file, where it came from: "<zip>/<folder>/" or "")
        for i, (name, path) in enumerate(uploads):
            if name.lower().endswith(".zip"):
                items += _unzip(name, path, Path(tmp) / str(i), result)
            else:
                items.append((name, path, ""))
        renamed = {}  # (origin, image stem as uploaded) -> stem in the folder: its caption file follows it
        for name, path, origin in sorted(items, key=lambda item: not _is_image(item[0])):  # images first
            stem = Path(name).stem
            try:
                kind = _kind(name)
                if kind == "image":
                    load_image(path)  # decodes it all: a truncated or fake image fails here
                    target = unused_path(dest / name)
                    renamed[origin, stem] = target.stem
                elif kind == "caption":
                    path.read_bytes().decode("utf-8")
                    target = dest / f"{renamed.get((origin, stem), stem)}{Path(name).suffix}"
                else:
                    target = dest / name
                if kind != "image" and target.exists():
                    raise _Refused(f"the folder has its own {target.name}: kept")
                atomic_write_with(target, lambda tmp_path, src=path: shutil.copyfile(src, tmp_path))
                result.added.append(target.name)
            except (ImageLoadError, _Refused) as e:
                result.refused.append((origin + name, str(e)))
            except UnicodeDecodeError:
                result.refused.append((origin + name, "not UTF-8 text"))
            except OSError as e:
                result.refused.append((origin + name, f"could not be copied ({e.strerror or e})"))
    return result


def _kind(name: str) -> str:
    """image, caption or metadata; anything else is refused."""
    if not name or name.startswith("."):
        raise _Refused("not a plain file name")
    if _is_image(name):
        return "image"
    if Path(name).suffix.lower() in CAPTION_SUFFIXES:
        return "caption"
    if name.lower() in METADATA_NAMES:
        return "metadata"
    raise _Refused("not an image or caption file")


def _base_name(name: str) -> str:
    return name.replace("\\", "/").rsplit("/", 1)[-1]


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _unzip(zip_name: str, path: Path, scratch: Path, result: Added) -> List[Tuple[str, Path, str]]:
    """The zip's image and caption files, each by its base name, unpacked under `scratch`."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        result.refused.append((zip_name, f"not a readable zip ({e})"))
        return []
    items = []
    with archive:
        for i, info in enumerate(archive.infolist()):
            name = _base_name(info.filename)
            shown = f"{zip_name}/{info.filename}"
            if info.is_dir() or "__MACOSX/" in info.filename or not name or name.startswith("."):
                continue  # folders, macOS resource forks and hidden files: nothing to train on
            try:
                _kind(name)
                if info.file_size > MAX_MEMBER_BYTES:
                    raise _Refused(f"{info.file_size // 2**20} MB unpacked: too large")
                out = scratch / str(i) / name
                out.parent.mkdir(parents=True)
                with archive.open(info) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except _Refused as e:
                result.refused.append((shown, str(e)))
                continue
            except (zipfile.BadZipFile, RuntimeError, zlib.error, EOFError, OSError) as e:  # RuntimeError: encrypted
                result.refused.append((shown, f"could not be unpacked ({e})"))
                continue
            items.append((name, out, f"{zip_name}/{info.filename[:-len(name)]}"))
    return items
