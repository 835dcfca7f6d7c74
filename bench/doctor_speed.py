"""Seconds the dataset doctor (`lora_trainer.data.doctor.examine`) takes for a folder of 1024 px images.

Generates a folder of photo-like pictures (gradients, shapes and grain, so PNGs are as large as
real ones): a mix of JPEG and PNG at 1024x1024, 1216x832 and 832x1216, with a few planted
duplicates (identical files and the same pixels saved as BMP) and near duplicates (half-size
JPEG copies, brightened copies). Then times `examine` on it with the default config and prints
a table, and whether exactly the planted copies were found. The target is 500 images in 60 s
on a 2-core CPU.

    python bench/doctor_speed.py                       # 500 images in a temp folder
    python bench/doctor_speed.py --images 100 --keep output/doctor_bench   # reuse the folder next time
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = [(1024, 1024), (1216, 832), (832, 1216)]


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=500, help="images in the folder, planted copies included")
    p.add_argument("--copies", type=int, default=5, help="planted copies of each kind (duplicate, near)")
    p.add_argument("--keep", default="", metavar="DIR", help="generate into DIR (once) and keep it")
    return p.parse_args(argv)


def _picture(seed: int, size: tuple[int, int]):
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    w, h = size[0] // 4, size[1] // 4  # drawn small, enlarged: cheap, and smooth like a photo
    y, x = np.mgrid[0:h, 0:w]
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = (x / w * rng.random() + y / h * rng.random())[..., None] / 2
    img = Image.fromarray((c0 * (1 - t) + c1 * t).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(10):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        ew, eh = (int(v) for v in rng.integers(min(w, h) // 10, min(w, h) // 2, 2))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x0 + ew, y0 + eh), fill=fill)
    big = np.asarray(img.resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.integers(-6, 7, big.shape, dtype=np.int16)  # sensor-like noise: PNGs of 2-3 MB
    return Image.fromarray(np.clip(big + grain, 0, 255).astype(np.uint8))


def generate(folder: Path, n: int, copies: int) -> dict[str, set[str]]:
    """Write `n` images into `folder`; return the planted copies by problem code."""
    from PIL import Image, ImageEnhance

    from lora_trainer.data.captions import write_captions

    folder.mkdir(parents=True, exist_ok=True)
    originals = n - 2 * copies
    for i in range(originals):
        img = _picture(i, SIZES[i % len(SIZES)])
        if i % 2:
            img.save(folder / f"img{i:04d}.jpg", quality=92)
        else:
            img.save(folder / f"img{i:04d}.png", compress_level=6)
    planted: dict[str, set[str]] = {"duplicate": set(), "near_duplicate": set()}
    for k in range(copies):
        src = folder / f"img{2 * k:04d}.png"  # even numbers are PNGs
        if k % 2:
            shutil.copyfile(src, folder / f"zz_copy{k}.png")
            planted["duplicate"].add(f"zz_copy{k}.png")
        else:
            Image.open(src).save(folder / f"zz_copy{k}.bmp")
            planted["duplicate"].add(f"zz_copy{k}.bmp")
        img = Image.open(folder / f"img{2 * k + 20:04d}.png").convert("RGB")
        if k % 2:
            ImageEnhance.Brightness(img).enhance(1.15).save(folder / f"zz_near{k}.png")
            planted["near_duplicate"].add(f"zz_near{k}.png")
        else:
            img.resize((img.width // 2, img.height // 2), Image.Resampling.LANCZOS).save(
                folder / f"zz_near{k}.jpg", quality=70)
            planted["near_duplicate"].add(f"zz_near{k}.jpg")
    names = sorted(p.name for p in folder.iterdir() if p.suffix in (".jpg", ".png", ".bmp"))
    write_captions(folder, {name: f"zxq, picture {i}, gradient with shapes, film grain" for i, name in enumerate(names)})
    (folder / "planted.json").write_text(json.dumps({k: sorted(v) for k, v in planted.items()}), encoding="utf-8")
    return planted


def main(argv=None) -> int:
    from lora_trainer.data.doctor import examine

    args = _args(argv)
    temp = None
    if args.keep:
        folder = Path(args.keep)
    else:
        temp = tempfile.TemporaryDirectory(prefix="doctor_bench_")
        folder = Path(temp.name)
    try:
        if (folder / "planted.json").is_file():
            planted = {k: set(v) for k, v in json.loads((folder / "planted.json").read_text(encoding="utf-8")).items()}
        else:
            start = time.perf_counter()
            planted = generate(folder, args.images, args.copies)
            print(f"generated {args.images} images in {time.perf_counter() - start:.0f} s: {folder}")
        files = [p for p in folder.iterdir() if p.suffix in (".jpg", ".png", ".bmp")]
        megabytes = sum(p.stat().st_size for p in files) / 1e6
        start = time.perf_counter()
        report = examine(folder)
        seconds = time.perf_counter() - start
    finally:
        if temp is not None:
            temp.cleanup()
    kinds = {ext: sum(p.suffix == ext for p in files) for ext in (".jpg", ".png", ".bmp")}
    print(f"\n| images | jpg / png / bmp | MB on disk | seconds | images/s |\n|---|---|---|---|---|\n"
          f"| {report.images} | {kinds['.jpg']} / {kinds['.png']} / {kinds['.bmp']} | {megabytes:.0f} | "
          f"{seconds:.1f} | {report.images / seconds:.1f} |")
    print("\nfindings by code: " + ", ".join(f"{code} {n}" for code, n in report.counts().items()))
    ok = True
    for code, names in planted.items():
        got = {f.file for f in report.findings if f.problem == code}
        ok &= got == names
        print(f"{code}: planted {sorted(names)}, found {sorted(got)}")
    print(report.summary())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
