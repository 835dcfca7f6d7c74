"""Duplicates: the same pixels under another name or format, and near copies of one picture.

An exact duplicate has the same decoded pixels (pixels.Look.pixel_hash), whatever the file name,
format or metadata. A near duplicate is a resized, recompressed or lightly edited copy: their
signatures (pixels.signature: 8x8 colour averages, mean-free, unit length) have a cosine
similarity of at least NEAR. Measured on 100 generated scenes, the demo images and 207 ComfyUI
template pictures: half-size copies, JPEG quality 60, +20 % brightness and +30 % contrast stay at
0.97 or more; a 3 % crop on every side stays at 0.95 or more on generated scenes and above 0.9 for
99 % of the real pictures. Different generated scenes stay under 0.6, the demo images under 0.77,
unrelated real pictures under 0.83; every real pair above 0.9 was two versions of one picture
(inpainted, relit, blurred, upscaled). tests/test_doctor.py keeps the generated half of this.
Grey dHash/pHash were measured too and rejected: they call the same layout in other colours (the
demo images) identical, and put different generated scenes 2 bits apart.

Each copy is reported once, on the later file by name, naming the earlier one; exact duplicates
are not reported again as near duplicates.
"""

from __future__ import annotations

from .pixels import Look
from .report import Finding

NEAR = 0.9
_BLOCK = 512  # rows of the similarity matrix computed at once (memory stays O(block x images))


def duplicate_findings(looks: list[Look]) -> list[Finding]:
    """duplicate and near_duplicate findings for the readable images in `looks` (sorted by name)."""
    first: dict[str, Look] = {}
    found, originals = [], []
    for seen in looks:
        if seen.error:
            continue
        original = first.setdefault(seen.pixel_hash, seen)
        if original is seen:
            originals.append(seen)
            continue
        how = "an identical file" if original.file_hash == seen.file_hash else "the same pixels in another file"
        found.append(Finding(
            seen.name, "duplicate", "warning", f"{how} as {original.name}: it is trained twice as often",
            f"Delete {seen.name} or {original.name}; use repeats to weight images on purpose."))
    return found + _near_duplicates(originals)


def _near_duplicates(looks: list[Look]) -> list[Finding]:
    import numpy as np

    if len(looks) < 2:
        return []
    signatures = np.stack([seen.signature for seen in looks])
    found = []
    for start in range(0, len(looks), _BLOCK):
        stop = min(len(looks), start + _BLOCK)
        similar = signatures[start:stop] @ signatures[:stop].T  # row j against every image before it
        for j in range(max(start, 1), stop):
            row = similar[j - start, :j]
            i = int(row.argmax())
            if row[i] >= NEAR:
                found.append(_near(looks[j], looks[i], float(row[i])))
    return found


def _near(copy: Look, original: Look, similarity: float) -> Finding:
    return Finding(
        copy.name, "near_duplicate", "warning",
        f"looks like {original.name} (similarity {similarity:.2f}; {copy.size} vs {original.size}): "
        "a resized, recompressed or lightly edited copy weighs that picture double",
        f"Keep the better of {copy.name} and {original.name} (usually the larger, less compressed one) and delete "
        "the other; if both are wanted, say in their captions what differs.")
