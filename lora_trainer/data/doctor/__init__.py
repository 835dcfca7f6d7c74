"""The dataset doctor: what training would skip, crop, repeat or misread, found before training.

`examine(folder, cfg)` opens every image and caption once and returns a `DoctorReport`: the
findings (file, problem, severity, detail, fix), the usable images, the bucket histogram and the
steps per epoch and in total for the config. The CLI (`python -m lora_trainer doctor`), the
A1111/Forge tab and the ComfyUI node all call it. Its rules are training's own: images are
opened by `images.load_image`, captions read by `captions.read_captions`, buckets and steps
come from `dataset`.

Severities:

- **error**: training would not use the image as it stands, or cannot start: `unreadable`,
  `too_small` when the shorter side is under 64 px (or min_bucket_reso / 4), `no_images`.
  The CLI exits with 1 when there is one.
- **warning**: trained, but probably not as meant: `too_small` (below the smallest bucket:
  enlarged), `extreme_aspect`, `duplicate`, `near_duplicate`, `no_caption`, `orphan_caption`,
  `missing_trigger` when training will not add the word, `caption_too_long`, `caption_file`.
- **info**: a note, nothing to do: `missing_trigger` when `trigger_word` is that word (training
  puts it first in every caption that lacks it).

A healthy image gets no finding at all.
"""

from .examine import examine
from .report import PROBLEMS, SEVERITIES, TABLE_COLUMNS, DoctorReport, Finding

__all__ = ["PROBLEMS", "SEVERITIES", "TABLE_COLUMNS", "DoctorReport", "Finding", "examine"]
