"""The dataset stage: a validated image folder, aspect-ratio buckets, and per-epoch batches.

`scan_images` opens every image once before training (see `images.load_image`) and says what
it used, fixed and skipped. Buckets follow kohya: sides are multiples of `bucket_reso_steps`
between `min_bucket_reso` and `max_bucket_reso`, with an area of at most `resolution`²; each
image goes to the bucket of nearest aspect ratio, is resized to cover it and cropped to it.
`epoch_batches` depends only on the records, the config, the seed and the epoch, so a resumed
run replays exactly the batches it would have seen.

Images are skipped when they cannot be decoded, are over Pillow's decompression-bomb limit, or
their shorter side is under `images.min_side(min_bucket_reso)`: 64 px, or min_bucket_reso / 4
when that is larger.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from PIL import Image

from .captions import read_captions
from ..errors import DatasetError
from .images import IMAGE_EXTENSIONS, ImageLoadError, list_images, load_image, min_side
from .masks import MaskError, find_mask, load_mask, read_mask

if TYPE_CHECKING:
    from ..config import TrainConfig

Bucket = tuple[int, int]  # (width, height)


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    name: str  # file name inside train_data_dir
    caption: str  # trigger word applied; shuffling and dropout happen at use time
    width: int  # after EXIF orientation
    height: int
    content_hash: str  # sha1 hex of the file's bytes: what the latent cache keys on
    is_reg: bool = False  # a regularization (class) image from reg_data_dir: its loss weighs prior_loss_weight
    mask: Optional[Path] = None  # masked_loss: the mask file (the image itself: its alpha channel); None: all white


@dataclass
class DatasetReport:
    used: list[str] = field(default_factory=list)
    fixed: list[tuple[str, str]] = field(default_factory=list)  # (name, what was fixed)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, why)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        counts = f"{len(self.used)} used, {len(self.fixed)} fixed, {len(self.skipped)} skipped"
        lines = [f"{counts}, {len(self.warnings)} warnings"]
        lines += [f"skipped {name}: {why}" for name, why in self.skipped]
        lines += [f"fixed {name}: {what}" for name, what in self.fixed]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


@dataclass
class PreparedImage:
    pixels: Any  # torch.FloatTensor, 3 x H x W, values in [-1, 1]
    original_size: tuple[int, int]  # (h, w) after EXIF orientation, before resizing
    crop_top_left: tuple[int, int]  # (top, left) in the resized image (SDXL micro-conditioning)
    target_size: tuple[int, int]  # (h, w) = the bucket


# -- scanning ----------------------------------------------------------------------------------

def scan_images(cfg: TrainConfig, on_progress: Callable[[int, int], None] | None = None, default_caption: str = "",
                ) -> tuple[list[ImageRecord], DatasetReport]:
    """Validate every image in cfg.train_data_dir (and with masked_loss its mask); raise DatasetError when none is
    usable. An image without a caption gets `default_caption` when one is given."""
    folder = image_folder(cfg)
    captions = read_captions(folder, cfg.metadata_path, cfg.caption_extension)
    report = DatasetReport(warnings=[str(p) for p in captions.problems])
    paths = list_images(folder)
    records: list[ImageRecord] = []
    seen: dict[str, str] = {}
    smallest = min_side(cfg.min_bucket_reso)
    for i, path in enumerate(paths):
        if on_progress is not None:
            on_progress(i, len(paths))
        try:
            loaded = load_image(path)
        except ImageLoadError as e:
            report.skipped.append((path.name, str(e)))
            continue
        width, height = loaded.image.size
        if min(width, height) < smallest:
            why = f"too small: {width}x{height}, the shorter side must be at least {smallest} px"
            report.skipped.append((path.name, why))
            continue
        mask = None
        if cfg.masked_loss:
            try:
                mask = _checked_mask(path, cfg, loaded.image.size, report)
            except MaskError as e:
                report.skipped.append((path.name, f"its mask cannot be used: {e}"))
                continue
        report.fixed += [(path.name, what) for what in loaded.fixes]
        if loaded.content_hash in seen:
            report.warnings.append(f"{path.name} is the same file as {seen[loaded.content_hash]}")
        seen.setdefault(loaded.content_hash, path.name)
        caption = captions.caption_for(path.name) or default_caption
        if not caption:
            report.warnings.append(f"{path.name} has no caption; "
                                   + (f"using the trigger word '{cfg.trigger_word}'" if cfg.trigger_word
                                      else "training it with an empty caption"))
        records.append(ImageRecord(path, path.name, apply_trigger(caption or "", cfg.trigger_word),
                                   width, height, loaded.content_hash, mask=mask))
        report.used.append(path.name)
    if on_progress is not None:
        on_progress(len(paths), len(paths))
    _warn_unmatched(captions.captions, paths, captions.metadata_file, report)
    if not records:
        raise DatasetError(no_images_message(folder, report))
    return records, report


def _checked_mask(path: Path, cfg: TrainConfig, size: tuple[int, int], report: DatasetReport) -> Optional[Path]:
    mask = find_mask(path, cfg.mask_dir)
    if mask is None:
        report.warnings.append(f"{path.name} has no mask ({path.stem}_mask.png, mask_dir or alpha): trained whole")
        return None
    stored = read_mask(mask, path)
    if stored.size != size:
        report.fixed.append((path.name, f"mask {stored.width}x{stored.height} resized to the image's "
                                        f"{size[0]}x{size[1]}"))
    return mask


def scan_regularization(cfg: TrainConfig) -> tuple[list[ImageRecord], DatasetReport]:
    """reg_data_dir's class images, read like train_data_dir's (no trigger word; class_prompt where one has no
    caption), named reg/<file>; DatasetError when the folder is missing or holds none."""
    folder = Path(cfg.reg_data_dir)
    if not folder.is_dir():
        raise DatasetError(f"reg_data_dir not found: {cfg.reg_data_dir}. Point it at a folder of class images, or "
                           "set reg_generate: N to make them there.")
    if not list_images(folder):
        raise DatasetError(f"reg_data_dir {folder} holds no images: put class images in it, or set reg_generate: N "
                           "(with class_prompt) to make them from the base model.")
    records, report = scan_images(regularization_config(cfg), default_caption=cfg.class_prompt)
    return [replace(r, name=f"reg/{r.name}", is_reg=True) for r in records], report


def missing_class_images(cfg: TrainConfig) -> int:
    """How many images reg_generate still has to make in reg_data_dir (training/class_images.py makes them)."""
    if not cfg.reg_generate:
        return 0
    folder = Path(cfg.reg_data_dir)
    return max(0, cfg.reg_generate - (len(list_images(folder)) if folder.is_dir() else 0))


def regularization_config(cfg: TrainConfig) -> TrainConfig:
    """cfg as it reads reg_data_dir: that folder as the image folder, its own captions, no trigger word, no masks
    (class images are trained whole)."""
    return cfg.replace(train_data_dir=cfg.reg_data_dir, metadata_path="", trigger_word="", reg_data_dir="",
                       reg_generate=0, masked_loss=False, mask_dir="", validation_split=0.0, validation_dir="",
                       save_best=False)


def unmatched_captions(captions: Mapping[str, str], paths: list[Path]) -> list[str]:
    """Names the captions mention that match none of `paths` (compared as `CaptionSet.caption_for` does)."""
    present = {p.name.lower() for p in paths}
    return [n for n in captions if n.lower() not in present and n.rsplit("/", 1)[-1].lower() not in present]


def image_folder(cfg: TrainConfig) -> Path:
    """cfg.train_data_dir as a folder that exists, else the DatasetError that says what to set."""
    folder = Path(cfg.train_data_dir)
    if not cfg.train_data_dir or not folder.is_dir():
        raise DatasetError(f"train_data_dir not found: {cfg.train_data_dir or '(empty)'}. "
                           "Point it at the folder that holds your training images.")
    return folder


def _warn_unmatched(captions: dict[str, str], paths: list[Path], source: Path | None, report: DatasetReport) -> None:
    missing = unmatched_captions(captions, paths)
    if missing and source is not None:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        report.warnings.append(f"{source.name} names {len(missing)} image(s) not in the folder: {shown}")


def no_images_message(folder: Path, report: DatasetReport) -> str:
    if report.skipped:
        reasons = "; ".join(f"{name}: {why}" for name, why in report.skipped[:5])
        more = f" (and {len(report.skipped) - 5} more)" if len(report.skipped) > 5 else ""
        return f"No usable image in {folder}: all {len(report.skipped)} were skipped. {reasons}{more}"
    nested = sorted(p.name for p in folder.iterdir() if p.is_dir() and list_images(p))
    if nested:
        return (f"No images directly in {folder}, but the subfolder(s) {', '.join(nested)} hold some. The folder "
                "must be flat: point train_data_dir at the folder of images (set repeats in the config).")
    return (f"No images in {folder}: put {', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)} files directly "
            "in it.")


# -- captions at use time ----------------------------------------------------------------------

def apply_trigger(caption: str, trigger: str) -> str:
    """Put the trigger word first unless the caption already contains it (as a whole word)."""
    trigger = trigger.strip()
    if not trigger:
        return caption
    if re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption, flags=re.IGNORECASE):
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def process_caption(caption: str, cfg: TrainConfig, rng: random.Random) -> str:
    """Caption dropout, then shuffle of the comma-separated parts after the first keep_tokens."""
    if cfg.caption_dropout_rate > 0 and rng.random() < cfg.caption_dropout_rate:
        return ""
    if not cfg.shuffle_caption:
        return caption
    parts = [p.strip() for p in caption.split(",") if p.strip()]
    kept, rest = parts[:cfg.keep_tokens], parts[cfg.keep_tokens:]
    rng.shuffle(rest)
    return ", ".join(kept + rest)


# -- buckets -----------------------------------------------------------------------------------

def _bounds(cfg: TrainConfig) -> tuple[int, int, int]:
    step = cfg.bucket_reso_steps
    square = cfg.resolution // step * step
    if square < step:
        raise DatasetError(f"resolution {cfg.resolution} is smaller than bucket_reso_steps {step}.")
    lo = min(math.ceil(cfg.min_bucket_reso / step) * step, square)  # the square bucket always fits
    hi = max(cfg.max_bucket_reso // step * step, square)
    return lo, hi, square


def make_buckets(cfg: TrainConfig) -> list[Bucket]:
    """All (w, h) with sides multiples of the step in [min, max] and w*h <= resolution², as wide as allowed."""
    step = cfg.bucket_reso_steps
    lo, hi, square = _bounds(cfg)
    max_area = cfg.resolution * cfg.resolution
    buckets = {(square, square)}
    for width in range(lo, hi + 1, step):
        height = min(hi, max_area // width // step * step)
        if height >= lo:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0]))


def assign_bucket(width: int, height: int, buckets: list[Bucket], cfg: TrainConfig) -> Bucket:
    """The bucket of nearest aspect ratio; with bucket_no_upscale, one that fits inside a small image."""
    if not cfg.enable_bucket:
        return cfg.resolution, cfg.resolution
    ratio = math.log(width / height)
    best = min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1], b))
    if not cfg.bucket_no_upscale or (best[0] <= width and best[1] <= height):
        return best
    # Never enlarge: shrink to the target area if larger, then round each side down to the step.
    step = cfg.bucket_reso_steps
    _, hi, _ = _bounds(cfg)
    scale = min(1.0, math.sqrt(cfg.resolution * cfg.resolution / (width * height)))
    fit_w = max(step, min(hi, int(width * scale) // step * step))
    fit_h = max(step, min(hi, int(height * scale) // step * step))
    return fit_w, fit_h


# -- pixels ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Crop:
    """Where an image lands in its bucket: computed from sizes alone, without decoding pixels."""
    resized: tuple[int, int]  # (w, h) after resizing to cover the bucket
    left: int
    top: int
    flip: bool

    def conditioning(self, record: ImageRecord, bucket: Bucket) -> tuple[tuple[int, int], tuple[int, int],
                                                                         tuple[int, int]]:
        """SDXL's (original_size, crop_top_left, target_size), all (h, w)."""
        left = self.resized[0] - bucket[0] - self.left if self.flip else self.left  # left in the mirrored image
        return (record.height, record.width), (self.top, left), (bucket[1], bucket[0])


def plan_crop(record: ImageRecord, bucket: Bucket, flip: bool = False, crop_rng: random.Random | None = None) -> Crop:
    """Resize to cover the bucket, then crop centred (or at a crop_rng-chosen place)."""
    bw, bh = bucket
    w, h = record.width, record.height
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    if crop_rng is not None:
        left, top = crop_rng.randint(0, rw - bw), crop_rng.randint(0, rh - bh)
    else:
        left, top = (rw - bw) // 2, (rh - bh) // 2
    return Crop((rw, rh), left, top, flip)


def prepare_image(record: ImageRecord, bucket: Bucket, flip: bool = False,
                  crop_rng: random.Random | None = None, crop: Crop | None = None) -> PreparedImage:
    """Resize to cover the bucket (Lanczos), crop to it (centre, or random with crop_rng), mirror if flip."""
    import numpy as np
    import torch

    crop = crop or plan_crop(record, bucket, flip, crop_rng)
    try:
        img = load_image(record.path).image
    except ImageLoadError as e:
        raise DatasetError(f"{record.name} can no longer be read: {e}. Was it changed after the scan?") from None
    img = fit_to_bucket(img, crop, bucket, Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
    original, top_left, target = crop.conditioning(record, bucket)
    return PreparedImage(pixels, original, top_left, target)


def prepare_mask(record: ImageRecord, bucket: Bucket, crop: Crop) -> Any:
    """The record's mask (1 × H × W in [0, 1]) through the same resize, crop and flip as its pixels; all ones when
    it has none."""
    import numpy as np
    import torch

    if record.mask is None:
        return torch.ones((1, bucket[1], bucket[0]))
    try:
        mask = load_mask(record.mask, record.path, (record.width, record.height))
    except MaskError as e:
        raise DatasetError(f"{record.name}: {e}. Was it changed after the scan?") from None
    mask = fit_to_bucket(mask, crop, bucket, Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(mask, dtype=np.uint8))[None].float().div_(255.0)


def fit_to_bucket(img: Image.Image, crop: Crop, bucket: Bucket, resample: Image.Resampling) -> Image.Image:
    """Resize to crop.resized, crop to the bucket at crop's place, mirror if crop.flip: an image and its mask alike."""
    bw, bh = bucket
    if crop.resized != img.size:
        img = img.resize(crop.resized, resample, reducing_gap=3.0 if resample == Image.Resampling.LANCZOS else None)
    img = img.crop((crop.left, crop.top, crop.left + bw, crop.top + bh))
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if crop.flip else img


# -- batches -----------------------------------------------------------------------------------

def _by_bucket(records: list[ImageRecord], cfg: TrainConfig) -> dict[Bucket, list[ImageRecord]]:
    buckets = make_buckets(cfg) if cfg.enable_bucket else []
    groups: dict[Bucket, list[ImageRecord]] = {}
    for record in sorted(records, key=lambda r: r.name):
        groups.setdefault(assign_bucket(record.width, record.height, buckets, cfg), []).append(record)
    return dict(sorted(groups.items()))


def _epoch_groups(records: list[ImageRecord], cfg: TrainConfig) -> dict[Bucket, list[ImageRecord]]:
    """Each bucket's images for one epoch: every training image `repeats` times, then as many regularization
    images as that makes in all (kohya's rule: the class images in name order, cycled when there are fewer)."""
    train = _by_bucket([r for r in records if not r.is_reg], cfg)
    items = {bucket: group * cfg.repeats for bucket, group in train.items()}
    reg = sorted((r for r in records if r.is_reg), key=lambda r: r.name)
    if reg:
        count = sum(len(group) for group in items.values())
        for bucket, group in _by_bucket([reg[i % len(reg)] for i in range(count)], cfg).items():
            items[bucket] = items.get(bucket, []) + group
    return dict(sorted(items.items()))


def epoch_batches(records: list[ImageRecord], cfg: TrainConfig, epoch: int, seed: int, processes: int = 1,
                  ) -> list[list[tuple[ImageRecord, Bucket]]]:
    """One epoch: each image `repeats` times (and the class images, see _epoch_groups), batches of one bucket
    each, in a (seed, epoch)-seeded order.

    With several processes these are the global batches (batch_size × processes), which they share.
    """
    rng = random.Random(f"lora-scripts:{seed}:{epoch}")  # str seeds are hashed stably across runs
    size = cfg.batch_size * processes
    batches = []
    for bucket, items in _epoch_groups(records, cfg).items():
        rng.shuffle(items)
        for start in range(0, len(items), size):
            batches.append([(record, bucket) for record in items[start:start + size]])
    rng.shuffle(batches)
    return batches


def batches_per_epoch(records: list[ImageRecord], cfg: TrainConfig, processes: int = 1) -> int:
    """len(epoch_batches(...)) without building them: for step counts and schedulers."""
    size = cfg.batch_size * processes
    return sum(math.ceil(len(items) / size) for items in _epoch_groups(records, cfg).values())


def optimizer_steps(batches: int, cfg: TrainConfig) -> tuple[int, int]:
    """(steps per epoch, total steps) for `batches` batches per epoch: what training runs and schedules."""
    per_epoch = max(1, math.ceil(batches / cfg.gradient_accumulation_steps))
    return per_epoch, cfg.max_train_steps or cfg.epochs * per_epoch
