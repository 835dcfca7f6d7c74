"""Caption files: reading and writing the captions of an image folder.

Where captions come from, first match wins for each image:

1. `metadata_path` when the config names one (`.csv` or `.jsonl`, by extension);
2. otherwise `metadata.csv` in the image folder, else `metadata.jsonl` there;
3. a sidecar `<image stem><caption_extension>` (`.txt` by default) next to each image the
   metadata file does not mention.

`metadata.csv` is written the way the seed documents write it: no header, one image per line,
and everything after the FIRST comma is the caption, commas included:

    img001.jpg,a red circle on a teal background, flat style

A header row (`file_name,text`, `file,caption`, `image,caption`, ...) is recognized and skipped,
and RFC-4180 quoting (`"a, b"` with `""` for a quote) works too: a caption that starts with a
double quote is read as a quoted field. Blank lines and a byte-order mark are ignored.
`metadata.jsonl` holds one `{"file_name": ..., "text": ...}` object per line ("file"/"image"
and "caption" are accepted too). Files should be UTF-8; a line that is not is read as GBK when
every such line is valid GBK, else as Windows-1252, and reported by line number.

Captions are normalized on read and write: surrounding whitespace stripped, line breaks
collapsed to single spaces.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import DatasetError
from ...files import atomic_write_text
from ..images import IMAGE_EXTENSIONS, list_images

NAME_KEYS = ("file_name", "filename", "file", "image", "image_file", "img", "path")
CAPTION_KEYS = ("text", "caption", "prompt", "tags", "description")
CAPTION_FORMATS = ("csv", "jsonl", "txt")


@dataclass
class CaptionProblem:
    source: str  # file name of the captions file or sidecar
    line: int  # 1-based; 0 when it concerns the whole file
    reason: str

    def __str__(self) -> str:
        where = f"{self.source} line {self.line}" if self.line else self.source
        return f"{where}: {self.reason}"


@dataclass
class CaptionSet:
    """Image name (as written in the captions file, relative to the folder) → caption."""

    captions: dict[str, str] = field(default_factory=dict)
    problems: list[CaptionProblem] = field(default_factory=list)
    metadata_file: Path | None = None  # the metadata file used, if any
    from_sidecars: list[str] = field(default_factory=list)  # names captioned by a sidecar file
    _index: tuple[int, dict[str, str]] = field(default=(-1, {}), repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.captions)

    def __contains__(self, name: object) -> bool:
        return name in self.captions

    def __getitem__(self, name: str) -> str:
        return self.captions[name]

    def caption_for(self, name: str) -> str | None:
        """The caption of image `name`: exact match, else the same file name in another case or folder."""
        if name in self.captions:
            return self.captions[name]
        if self._index[0] != len(self.captions):  # maps spellings to keys, so edited captions stay current
            self._index = (len(self.captions), loose_index(self.captions))
        key = self._index[1].get(name.lower())
        return self.captions.get(key) if key is not None else None


def loose_index(captions: Mapping[str, str]) -> dict[str, str]:
    """Lower-cased names and lower-cased base names → the name as written (full names win over base names)."""
    index = {key.rsplit("/", 1)[-1].lower(): key for key in captions}
    index.update((key.lower(), key) for key in captions)
    return index


def normalize_caption(text: str) -> str:
    """Strip surrounding whitespace and collapse line breaks (with their indentation) to one space."""
    return re.sub(r"[ \t]*[\r\n]+\s*", " ", text).strip()


def normalize_name(name: str) -> str:
    name = name.strip().replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name


# -- reading -----------------------------------------------------------------------------------

def read_captions(folder: str | Path, metadata_path: str | Path = "", caption_extension: str = ".txt") -> CaptionSet:
    """Read every caption for the images in `folder` (see the module docstring for the precedence)."""
    folder = Path(folder)
    result = CaptionSet()
    meta = _find_metadata(folder, metadata_path, result)
    if meta is not None:
        result.metadata_file = meta
        text = _decode(meta.read_bytes(), meta.name, result.problems)
        reader = _read_jsonl if meta.suffix.lower() in (".jsonl", ".json") else _read_csv
        for line, name, caption in reader(text, meta.name, result.problems):
            name = normalize_name(name)
            if not name:
                result.problems.append(CaptionProblem(meta.name, line, "no file name before the first comma"))
                continue
            if name in result.captions:
                result.problems.append(CaptionProblem(meta.name, line, f"{name} listed again; this line wins"))
            result.captions[name] = normalize_caption(caption)
    if folder.is_dir():
        _read_sidecars(folder, caption_extension, result)
    return result


def _find_metadata(folder: Path, metadata_path: str | Path, result: CaptionSet) -> Path | None:
    if metadata_path:
        path = Path(metadata_path)
        if not path.is_file() and not path.is_absolute() and (folder / path).is_file():
            path = folder / path  # a bare "metadata.csv" means the one in the image folder
        if not path.is_file():
            raise DatasetError(f"metadata_path not found: {metadata_path}. Fix the path or leave it empty.")
        if path.suffix.lower() not in (".csv", ".jsonl", ".json"):
            raise DatasetError(f"metadata_path must be a .csv or .jsonl file, got {path.name}.")
        return path
    found = [p for p in (folder / "metadata.csv", folder / "metadata.jsonl") if p.is_file()]
    if len(found) == 2:
        result.problems.append(CaptionProblem("metadata.jsonl", 0, "ignored: metadata.csv takes precedence"))
    return found[0] if found else None


def _read_sidecars(folder: Path, caption_extension: str, result: CaptionSet) -> None:
    ext = caption_extension if caption_extension.startswith(".") else f".{caption_extension}"
    shadowed = 0
    listed = loose_index(result.captions)  # what the metadata file captions, built once
    for image in list_images(folder):
        sidecar = image.with_suffix(ext)
        if not sidecar.is_file():
            continue
        if image.name in result.captions or image.name.lower() in listed:
            shadowed += 1
            continue
        try:
            data = sidecar.read_bytes()
        except OSError as e:
            result.problems.append(CaptionProblem(sidecar.name, 0, f"cannot read: {e.strerror or e}"))
            continue
        result.captions[image.name] = normalize_caption(_decode(data, sidecar.name, result.problems))
        result.from_sidecars.append(image.name)
    if shadowed and result.metadata_file is not None:
        result.problems.append(CaptionProblem(
            result.metadata_file.name, 0,
            f"{shadowed} {ext} sidecar file(s) ignored: this file already captions those images"))


def _decode(data: bytes, source: str, problems: list[CaptionProblem]) -> str:
    """UTF-8 (with or without BOM, or UTF-16 with BOM); other lines are decoded leniently and reported."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16", errors="replace")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    lines = data.split(b"\n")
    bad = []
    for i, raw in enumerate(lines):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            bad.append(i)
    encoding = "gbk" if all(_decodes(lines[i], "gbk") for i in bad) else "cp1252"
    for i in bad:
        lines[i] = lines[i].decode(encoding, errors="replace").encode("utf-8")
        problems.append(CaptionProblem(
            source, i + 1, f"not UTF-8; read as {encoding.upper()}: check the text and save the file as UTF-8"))
    return b"\n".join(lines).decode("utf-8")


def _decodes(raw: bytes, encoding: str) -> bool:
    try:
        raw.decode(encoding)
    except UnicodeDecodeError:
        return False
    return True


def _read_jsonl(text: str, source: str, problems: list[CaptionProblem]) -> Iterator[tuple[int, str, str]]:
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(CaptionProblem(source, number, f"not valid JSON ({e.msg})"))
            continue
        if not isinstance(row, dict):
            problems.append(CaptionProblem(source, number, 'expected an object like {"file_name": ..., "text": ...}'))
            continue
        name = next((row[k] for k in NAME_KEYS if isinstance(row.get(k), str)), None)
        caption = next((row[k] for k in CAPTION_KEYS if k in row), None)
        if name is None:
            problems.append(CaptionProblem(source, number, 'no "file_name" key'))
            continue
        if isinstance(caption, list):  # a list of tags
            caption = ", ".join(str(c) for c in caption)
        if not isinstance(caption, str):
            problems.append(CaptionProblem(source, number, f'{name}: no "text" key with a caption'))
            continue
        yield number, name, caption


# -- csv ---------------------------------------------------------------------------------------

@dataclass
class _Row:
    line: int
    fields: list[str]
    quoted: list[bool]
    starts: list[int]  # offset of each field in the text
    end: int  # offset of the end of the row (before its line break)


def _read_csv(text: str, source: str, problems: list[CaptionProblem]) -> Iterator[tuple[int, str, str]]:
    """Seed rule: everything after the first comma is the caption, unless it is a quoted field."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    name_col, caption_col, columns = 0, 1, 2
    for index, row in enumerate(_csv_rows(text, source, problems)):
        if index == 0 and _is_header(row.fields):
            lowered = [f.strip().lower() for f in row.fields]
            name_col = next(i for i, f in enumerate(lowered) if f in NAME_KEYS)
            caption_col = next(i for i, f in enumerate(lowered) if f in CAPTION_KEYS)
            columns = len(lowered)
            continue
        if len(row.fields) <= max(name_col, caption_col):
            problems.append(CaptionProblem(source, row.line, "no caption (expected: file name, comma, caption)"))
            continue
        if row.quoted[caption_col] or caption_col != columns - 1:
            caption = row.fields[caption_col]
        else:  # the caption is the last column: its unquoted commas belong to it
            caption = text[row.starts[caption_col]:row.end]
        yield row.line, row.fields[name_col], caption


def _is_header(fields: list[str]) -> bool:
    lowered = [f.strip().lower() for f in fields]
    return (any(f in NAME_KEYS for f in lowered) and any(f in CAPTION_KEYS for f in lowered)
            and not any(f.endswith(IMAGE_EXTENSIONS) for f in lowered))


def _csv_rows(text: str, source: str, problems: list[CaptionProblem]) -> Iterator[_Row]:
    """Split CSV text into rows, RFC-4180 quotes included (a quoted field may span lines)."""
    i, n, line = 0, len(text), 1
    while i < n:
        row = _Row(line, [], [], [], i)
        while True:
            row.starts.append(i)
            if i < n and text[i] == '"':
                value, i, closed = _quoted_field(text, i + 1)
                line += value.count("\n")
                j = i
                while i < n and text[i] not in ",\n":  # stray text after the closing quote: keep it
                    i += 1
                row.fields.append(value + text[j:i])
                row.quoted.append(True)
                if not closed:
                    problems.append(CaptionProblem(source, row.line, "a quote is never closed; read to the end"))
            else:
                j = i
                while i < n and text[i] not in ",\n":
                    i += 1
                row.fields.append(text[j:i])
                row.quoted.append(False)
            if i < n and text[i] == ",":
                i += 1
                continue
            break
        row.end = i
        if i < n:  # the line break
            i += 1
            line += 1
        if any(f.strip() for f in row.fields) or len(row.fields) > 1:
            yield row


def _quoted_field(text: str, i: int) -> tuple[str, int, bool]:
    out = []
    n = len(text)
    while i < n:
        c = text[i]
        if c == '"':
            if i + 1 < n and text[i + 1] == '"':
                out.append('"')
                i += 2
                continue
            return "".join(out), i + 1, True
        out.append(c)
        i += 1
    return "".join(out), i, False


# -- writing -----------------------------------------------------------------------------------

def write_captions(folder: str | Path, captions: Mapping[str, str], fmt: str = "csv", path: str | Path | None = None,
                   caption_extension: str = ".txt") -> Path:
    """Write captions atomically; `read_captions` gives back the same (normalized) dict.

    csv/jsonl go to `path` (default `folder/metadata.csv` or `folder/metadata.jsonl`); txt writes
    one sidecar per image next to it. Returns the file written (the folder for txt).
    """
    folder = Path(folder)
    if fmt not in CAPTION_FORMATS:
        raise DatasetError(f"Unknown caption format {fmt!r}: use one of {', '.join(CAPTION_FORMATS)}.")
    rows = [(_checked_name(folder, name), normalize_caption(str(caption))) for name, caption in captions.items()]
    if fmt == "txt":
        ext = caption_extension if caption_extension.startswith(".") else f".{caption_extension}"
        for name, caption in rows:
            atomic_write_text((folder / name).with_suffix(ext), caption + "\n")
        return folder
    target = Path(path) if path else folder / f"metadata.{fmt}"
    if fmt == "jsonl":
        lines = [json.dumps({"file_name": name, "text": caption}, ensure_ascii=False) for name, caption in rows]
    else:
        lines = [f"{_csv_name(name)},{_csv_caption(caption)}" for name, caption in rows]
    return atomic_write_text(target, "".join(line + "\n" for line in lines))


def _checked_name(folder: Path, name: str) -> str:
    clean = normalize_name(name)
    if not clean or "\n" in clean or "\r" in clean:
        raise DatasetError(f"Image name {name!r} cannot be written to a captions file.")
    if Path(clean).is_absolute() or ".." in Path(clean).parts:
        raise DatasetError(f"Image name {name!r} points outside the folder {folder}; use a name inside it.")
    return clean


def _quote(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def _csv_name(name: str) -> str:
    return _quote(name) if ("," in name or name.startswith('"') or name != name.strip()) else name


def _csv_caption(caption: str) -> str:
    # Unquoted is the seed format; only a caption that would be misread as a quoted field gets quotes.
    return _quote(caption) if caption.startswith('"') else caption
