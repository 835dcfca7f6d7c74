"""Captioning a folder: every image gets a caption, and no caption a person wrote is lost.

Where captions go (`fmt`, else the output's extension, else csv): `metadata.csv` in the seed format
(`file,caption`), `metadata.jsonl`, or `.txt` sidecars next to the images.

Which images are captioned: those with no caption yet, neither where `read_captions` looks (the
folder's metadata file, sidecars) nor in the output file; an empty caption counts as none. Images
that have one keep it (status "kept") and the model is not even loaded when nothing is left to do.

With `overwrite` every image is captioned again, and hand edits are still never lost: before the
first write, the file about to be replaced is copied to `<output>.bak` (`metadata.csv.bak`, then
`metadata.csv-v2.bak`, ...: an older backup is never replaced), and for `.txt` sidecars the captions
about to be replaced are saved as `captions.bak.csv` in the folder (same numbering).

The output file keeps all its earlier rows (rows of images no longer in the folder too) and gains
the new captions; captions kept from elsewhere (sidecars when writing metadata.csv) stay where they
are. Writes are atomic and happen after every batch, so a stop or a crash keeps every caption
written so far. An image that cannot be read is reported (status "failed" with the reason) and
skipped; the run goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ...callbacks import Callbacks
from ...errors import CaptionError
from ...files import atomic_write_bytes, unused_path
from ..images import ImageLoadError, list_images, load_image
from .captioner import Captioner, CaptionOptions, check_weights
from .files import CAPTION_FORMATS, CaptionSet, loose_index, read_captions, write_captions
from .shape import length_warning

STATUSES = ("new", "kept", "replaced", "failed")


@dataclass
class CaptionResult:
    name: str  # image file name, relative to the folder
    status: str  # new, kept, replaced (overwrite) or failed (unreadable image)
    caption: str = ""  # the caption the image has now
    previous: str = ""  # the caption it had before (kept, replaced)
    sentence: str = ""  # what the captioner wrote, before tags and trigger
    tags: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str = ""  # why a failed image could not be used


@dataclass
class CaptionReport:
    folder: Path
    output: Path  # the captions file (the folder for txt sidecars)
    fmt: str
    results: list[CaptionResult] = field(default_factory=list)
    backup: Path | None = None
    stopped: bool = False

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def failed(self) -> list[CaptionResult]:
        return [r for r in self.results if r.status == "failed"]

    def summary(self) -> str:
        done = self.count("new") + self.count("replaced")
        lines = [f"{done} captioned, {self.count('kept')} kept, {len(self.failed)} unreadable -> {self.output}"]
        lines += [f"  unreadable: {r.name}: {r.error}" for r in self.failed]
        lines += [f"  backup of the previous captions: {self.backup}"] if self.backup else []
        lines += ["  stopped before the end: run again to caption the rest"] if self.stopped else []
        return "\n".join(lines)


def resolve_output(folder: str | Path, output: str | Path | None = None, fmt: str | None = None) -> tuple[str, Path]:
    """(format, file) for a run: txt writes sidecars into the folder, csv/jsonl a file (default metadata.<fmt>)."""
    folder = Path(folder)
    suffix = Path(output).suffix.lower().lstrip(".") if output else ""
    if fmt and suffix in ("csv", "jsonl") and fmt != suffix:
        raise CaptionError(f"--format {fmt} does not match the output {Path(output).name}: use a .{fmt} file.")
    fmt = fmt or (suffix if suffix in ("csv", "jsonl") else "csv")
    if fmt not in CAPTION_FORMATS:
        raise CaptionError(f"Unknown caption format {fmt!r}: use one of {', '.join(CAPTION_FORMATS)}.")
    if fmt == "txt":
        return fmt, folder
    return fmt, Path(output) if output else folder / f"metadata.{fmt}"


def caption_folder(folder: str | Path, output: str | Path | None = None, fmt: str | None = None,
                   options: CaptionOptions | None = None, overwrite: bool = False,
                   callbacks: Callbacks | None = None, report: CaptionReport | None = None,
                   captioner: Captioner | None = None) -> Iterator[CaptionResult]:
    """Caption the images of `folder`, yielding one result per image as it is done (see the module docstring).

    `report`, when given, is filled as the run goes (output, backup, stopped). `captioner`, when given,
    is used and left open (a UI that keeps one loaded); otherwise one is loaded and released at the end.
    """
    folder = Path(folder)
    options = captioner.options if captioner is not None else options or CaptionOptions()
    callbacks = callbacks or Callbacks()
    if not folder.is_dir():
        raise CaptionError(f"Image folder not found: {folder}.")
    images = list_images(folder)
    if not images:
        raise CaptionError(f"No images (.jpg, .png, .webp, .bmp) in {folder}.")
    fmt, output = resolve_output(folder, output, fmt)
    report = report if report is not None else CaptionReport(folder, output, fmt)
    report.folder, report.output, report.fmt = folder, output, fmt
    seen = read_captions(folder)
    rows = _own_rows(folder, output, fmt, seen)
    _warn_precedence(folder, output, fmt, seen, callbacks)
    todo, index = [], loose_index(rows)
    for image in images:
        before = _existing(image.name, rows, index, seen)
        if before and not overwrite:
            warning = length_warning(before)
            yield _keep(report, CaptionResult(image.name, "kept", before, before, warnings=[warning] if warning else []))
        else:
            todo.append((image, before))
    if not todo:
        callbacks.on_status("every image already has a caption (use overwrite to caption them again)")
        return
    if captioner is None:  # missing weights: say so now, before any progress bar
        check_weights(options)
    if overwrite and any(before for _, before in todo):
        report.backup = _backup(folder, output, fmt, {i.name: b for i, b in todo if b})
        if report.backup is not None:
            callbacks.on_status(f"previous captions saved to {report.backup}")
    held = [captioner]

    def get_captioner() -> Captioner:  # loaded at the first readable image: none, no model
        if held[0] is None:
            held[0] = Captioner(options, callbacks)
        return held[0]

    try:
        yield from _run(get_captioner, todo, rows, folder, output, fmt, options.batch_size, callbacks, report)
    finally:
        if captioner is None and held[0] is not None:
            held[0].close()


def run_captioning(folder: str | Path, output: str | Path | None = None, fmt: str | None = None,
                   options: CaptionOptions | None = None, overwrite: bool = False,
                   callbacks: Callbacks | None = None) -> CaptionReport:
    """Caption a folder to the end and return what happened (the CLI's entry point)."""
    report = CaptionReport(Path(folder), Path(folder), fmt or "csv")
    for _ in caption_folder(folder, output, fmt, options, overwrite, callbacks, report):
        pass
    return report


def _run(get_captioner: Callable[[], Captioner], todo: list, rows: dict[str, str], folder: Path, output: Path, fmt: str,
         batch_size: int, callbacks: Callbacks, report: CaptionReport) -> Iterator[CaptionResult]:
    total = len(todo)
    callbacks.on_progress(0, total)
    for start in range(0, total, batch_size):
        if callbacks.should_stop():
            report.stopped = True
            callbacks.on_status(f"stopped after {start} of {total} images; their captions are saved")
            return
        batch, loaded, results = todo[start:start + batch_size], [], []
        for image, before in batch:
            try:
                loaded.append((image, before, load_image(image).image))
            except ImageLoadError as e:
                callbacks.on_status(f"skipped {image.name}: {e}")
                results.append(CaptionResult(image.name, "failed", before, before, error=str(e)))
        captions = get_captioner().caption([pixels for _, _, pixels in loaded]) if loaded else []
        written = {}
        for (image, before, _), caption in zip(loaded, captions):
            written[image.name] = caption.text
            for warning in caption.warnings:
                callbacks.on_status(f"{image.name}: {warning}")
            results.append(CaptionResult(image.name, "replaced" if before else "new", caption.text, before,
                                         caption.sentence, [t.phrase for t in caption.tags], caption.warnings))
        _write(folder, output, fmt, rows, written)
        callbacks.on_progress(min(start + batch_size, total), total)
        for result in sorted(results, key=lambda r: r.name):
            yield _keep(report, result)


def _keep(report: CaptionReport, result: CaptionResult) -> CaptionResult:
    report.results.append(result)
    return result


def _own_rows(folder: Path, output: Path, fmt: str, seen: CaptionSet) -> dict[str, str]:
    """The rows of the output file as it is now (csv/jsonl), in file order; {} for txt or a new file."""
    if fmt == "txt" or not output.is_file():
        return {}
    if seen.metadata_file is not None and seen.metadata_file.resolve() == output.resolve():
        own = seen
    else:
        own = read_captions(folder, metadata_path=output)
    return {name: text for name, text in own.captions.items() if name not in own.from_sidecars}


def _existing(name: str, rows: dict[str, str], index: dict[str, str], seen: CaptionSet) -> str:
    """The caption an image has now: its row in the output file, else wherever read_captions finds one."""
    key = name if name in rows else index.get(name.lower())
    if key is not None and rows[key]:
        return rows[key]
    return seen.caption_for(name) or ""


def _warn_precedence(folder: Path, output: Path, fmt: str, seen: CaptionSet, callbacks: Callbacks) -> None:
    """Say so when what we write would not be what training reads (read_captions' precedence)."""
    meta = seen.metadata_file
    if fmt == "txt" and meta is not None:
        callbacks.on_status(f"note: {meta.name} takes precedence over .txt sidecars for the images it lists")
    elif fmt == "jsonl" and output == folder / "metadata.jsonl" and (folder / "metadata.csv").is_file():
        callbacks.on_status("note: metadata.csv takes precedence over metadata.jsonl in this folder")


def _write(folder: Path, output: Path, fmt: str, rows: dict[str, str], written: dict[str, str]) -> None:
    if not written:
        return
    if fmt == "txt":
        write_captions(folder, written, "txt")
        return
    index = loose_index(rows)
    for name, text in written.items():
        rows[name if name in rows else index.get(name.lower(), name)] = text
    write_captions(folder, rows, fmt, path=output)


def _backup(folder: Path, output: Path, fmt: str, replaced: dict[str, str]) -> Path | None:
    """Save what overwrite is about to replace, without ever replacing an earlier backup.

    csv/jsonl: a byte copy of the output file (None when there is none yet: new rows then shadow
    sidecars, which stay on disk untouched). txt: the replaced sidecar captions as a csv.
    """
    if fmt != "txt":
        if not output.is_file():
            return None
        return atomic_write_bytes(unused_path(output.with_name(output.name + ".bak")), output.read_bytes())
    return write_captions(folder, replaced, "csv", path=unused_path(folder / "captions.bak.csv"))
