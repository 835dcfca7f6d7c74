"""What the doctor found: findings, the summary, and the ways front ends show them (JSON, table, text)."""

from __future__ import annotations

import json
import textwrap
from dataclasses import asdict, dataclass, field
from typing import Any

SEVERITIES = ("error", "warning", "info")
# Problem code -> what it means, in the order findings are listed (the legend a front end can show).
PROBLEMS: dict[str, str] = {
    "no_images": "the folder holds no image training could use",
    "unreadable": "the file cannot be decoded; training skips it",
    "mask_unreadable": "masked_loss: the image's mask cannot be decoded; training skips the image",
    "mask_size": "masked_loss: the mask's size differs from its image's; it is stretched to fit",
    "no_mask": "masked_loss: no mask for the image; it is trained whole",
    "too_small": "smaller than the smallest bucket: enlarged and soft, or skipped when tiny",
    "extreme_aspect": "aspect ratio outside the bucket range: cropped hard",
    "duplicate": "the same pixels as another image, whatever the name or format",
    "near_duplicate": "a resized, recompressed or lightly edited copy of another image",
    "no_caption": "no caption: trained with the trigger word alone, or an empty caption",
    "orphan_caption": "a caption for an image that is not in the folder",
    "missing_trigger": "the caption lacks the trigger word",
    "caption_too_long": "over 75 CLIP tokens: the text encoder cuts the end off",
    "caption_file": "a line of a captions file that could not be read as written",
}
TABLE_COLUMNS = ("file", "problem", "severity", "detail", "fix")


@dataclass(frozen=True)
class Finding:
    file: str  # name inside the folder (or the captions file's name)
    problem: str  # a key of PROBLEMS
    severity: str  # error, warning or info
    detail: str  # what is wrong, with the numbers
    fix: str  # one actionable sentence

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    def _order(self) -> tuple[int, int, str]:
        return SEVERITIES.index(self.severity), list(PROBLEMS).index(self.problem), self.file


@dataclass
class DoctorReport:
    folder: str
    images: int = 0  # image files in the folder
    usable: int = 0  # images training would use (readable, not too small to use)
    findings: list[Finding] = field(default_factory=list)
    buckets: dict[str, int] = field(default_factory=dict)  # "WxH" -> usable images in that bucket
    steps: dict[str, int] = field(default_factory=lambda: {"per_epoch": 0, "total": 0})
    settings: dict[str, Any] = field(default_factory=dict)  # the config keys the steps depend on

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True when nothing is an error (the CLI's exit code 0)."""
        return not self.errors

    def sort(self) -> None:
        self.findings.sort(key=Finding._order)

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "usable": self.usable, "findings": [f.to_dict() for f in self.findings],
                "buckets": dict(self.buckets), "steps": dict(self.steps)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    def counts(self) -> dict[str, int]:
        """Findings per problem code, in PROBLEMS order."""
        found = [f.problem for f in self.findings]
        return {code: found.count(code) for code in PROBLEMS if code in found}

    def summary(self) -> str:
        """One line: images, usable, errors and warnings, steps."""
        notes = sum(f.severity == "info" for f in self.findings)
        told = f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)" + (f", {notes} note(s)" if notes else "")
        return (f"{self.images} images, {self.usable} usable; {told}; "
                f"{self.steps['per_epoch']} steps per epoch, {self.steps['total']} in total")

    def table_rows(self) -> list[list[str]]:
        """One row per finding, columns TABLE_COLUMNS: what a UI table (gradio Dataframe) shows."""
        return [[f.file, f.problem, f.severity, f.detail, f.fix] for f in self.findings]

    def text(self, width: int = 100) -> str:
        """The CLI's report: one block per finding, then the summary, buckets and steps."""
        lines = []
        if self.findings:
            lines.append(f"{'severity':<9}{'problem':<18}file")
        indent = " " * 9
        for f in self.findings:
            lines.append(f"{f.severity:<9}{f.problem:<18}{f.file}")
            lines += textwrap.wrap(f.detail, width, initial_indent=indent, subsequent_indent=indent)
            lines += textwrap.wrap(f"fix: {f.fix}", width, initial_indent=indent, subsequent_indent=indent + "     ")
        if self.findings:
            lines.append("")
        lines.append(self.summary())
        if self.buckets:
            lines.append("buckets: " + ", ".join(f"{b} x{n}" for b, n in self.buckets.items()))
        if self.settings:
            lines.append("steps from: " + ", ".join(f"{k}: {v}" for k, v in self.settings.items()))
        return "\n".join(lines)
