"""`examine`: open every image and caption of a folder once and report what would go wrong in training."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import DatasetError
from ..captions import read_captions
from ..dataset import (
    DatasetReport,
    image_folder,
    no_images_message,
    apply_trigger,
    batches_per_epoch,
    make_buckets,
    missing_class_images,
    optimizer_steps,
    regularization_config,
)
from ..images import list_images
from .captions import caption_findings
from .likeness import duplicate_findings
from .masks import mask_findings
from .pixels import Look, bucket_of, look, record, size_findings, unreadable
from .report import DoctorReport, Finding

if TYPE_CHECKING:
    from ...config import TrainConfig


def examine(folder: str | Path | None = None, cfg: TrainConfig | None = None, metadata: str | Path | None = None,
            trigger: str | None = None, on_progress: Callable[[int, int], None] | None = None) -> DoctorReport:
    """Check `folder` (default: cfg.train_data_dir) for what training would skip, crop, repeat or misread.

    `cfg` gives the buckets, the step count and the caption settings (default: TrainConfig()'s);
    `metadata` overrides cfg.metadata_path and `trigger` the trigger word to look for (None or
    empty: cfg.trigger_word; no check when both are empty). `on_progress(done, total)` is called
    as images are opened. Raises DatasetError when the folder does not exist or a named captions
    file is missing; everything else is a finding.
    """
    if folder is not None and not Path(folder).expanduser().is_dir():  # given by the user, not by a config key
        raise DatasetError(f"Image folder not found: {folder}. Give the folder that holds your training images.")
    cfg = _config(folder, cfg, metadata)
    report, records = _examine(cfg, trigger, on_progress)
    if cfg.reg_data_dir:
        records += _regularization(cfg, report)
    if records:
        per_epoch, total = optimizer_steps(batches_per_epoch(records, cfg), cfg)
        report.steps = {"per_epoch": per_epoch, "total": total}
    report.sort()
    return report


def _examine(cfg: TrainConfig, trigger: str | None, on_progress: Callable[[int, int], None] | None,
             ) -> tuple[DoctorReport, list]:
    folder = image_folder(cfg)
    captions = read_captions(folder, cfg.metadata_path, cfg.caption_extension)
    paths = list_images(folder)
    report = DoctorReport(str(folder), images=len(paths))
    if not paths:
        report.findings.append(Finding(folder.name, "no_images", "error", no_images_message(folder, DatasetReport()),
                                       "Put the training images directly in the folder."))
    looks = _look_all(paths, on_progress)
    buckets = make_buckets(cfg)
    records = []
    for seen in looks:
        if seen.error:
            report.findings.append(unreadable(seen))
            continue
        bucket = bucket_of(seen, buckets, cfg)
        found = size_findings(seen, bucket, buckets, cfg)
        report.findings += found
        if any(f.severity == "error" for f in found):
            continue  # training skips it
        records.append(record(seen, apply_trigger(captions.caption_for(seen.name) or "", cfg.trigger_word)))
        key = f"{bucket[0]}x{bucket[1]}"
        report.buckets[key] = report.buckets.get(key, 0) + 1
    report.findings += duplicate_findings(looks)
    readable = {seen.name for seen in looks if not seen.error}
    wanted = (trigger or "").strip() or cfg.trigger_word.strip()
    report.findings += caption_findings(folder, paths, readable, captions, cfg, wanted)
    if cfg.masked_loss:
        report.findings += mask_findings([seen for seen in looks if not seen.error], cfg)
    report.usable = len(records)
    report.buckets = dict(sorted(report.buckets.items(), key=lambda kv: _aspect(kv[0])))
    report.settings = {k: getattr(cfg, k) for k in ("resolution", "batch_size", "repeats", "epochs",
                                                     "gradient_accumulation_steps", "max_train_steps")}
    return report, records


def _regularization(cfg: TrainConfig, report: DoctorReport) -> list:
    """reg_data_dir checked as train_data_dir is, its findings named reg/<file> in `report`; its usable images
    (as class images, for the step count)."""
    from dataclasses import replace

    missing = missing_class_images(cfg)
    folder = Path(cfg.reg_data_dir)
    if not folder.is_dir() or not list_images(folder):
        if missing:  # training makes them first
            report.findings.append(Finding("reg/", "no_images", "info", f"reg_data_dir {folder} holds no class "
                                           f"images yet: reg_generate makes {missing} before training.", ""))
        else:
            report.findings.append(Finding("reg/", "no_images", "error", f"reg_data_dir {folder} holds no images.",
                                           "Put class images in it, or set reg_generate: N with class_prompt."))
        return []
    reg, records = _examine(regularization_config(cfg), None, None)
    for found in reg.findings:
        if found.problem == "no_caption" and cfg.class_prompt:
            continue  # the class prompt is their caption
        report.findings.append(replace(found, file=f"reg/{found.file}"))
    return [replace(r, is_reg=True, name=f"reg/{r.name}") for r in records]


def _config(folder: str | Path | None, cfg: TrainConfig | None, metadata: str | Path | None) -> TrainConfig:
    from ...config import TrainConfig

    changes = {}
    if folder is not None:
        changes["train_data_dir"] = str(folder)
    if metadata is not None:
        changes["metadata_path"] = str(metadata)
    return cfg.replace(**changes) if cfg is not None else TrainConfig(**changes)


def _look_all(paths: list[Path], on_progress: Callable[[int, int], None] | None) -> list[Look]:
    looks = []
    for i, path in enumerate(paths):
        if on_progress is not None:
            on_progress(i, len(paths))
        looks.append(look(path))
    if on_progress is not None:
        on_progress(len(paths), len(paths))
    return looks


def _aspect(key: str) -> tuple[float, int]:
    w, h = (int(v) for v in key.split("x"))
    return w / h, w
