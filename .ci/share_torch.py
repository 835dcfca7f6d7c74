"""Make this interpreter's torch and torchvision (with their CUDA libraries) importable from another venv.

    python .ci/share_torch.py TARGET_VENV

Links every top-level file of those distributions into .ci/envs/shared-torch/ and writes a .pth file
into TARGET_VENV's site-packages that puts that folder on its sys.path (after its own site-packages,
so the venv's own packages win). numpy, Pillow and the small pure-Python requirements of torch are
left for the venv to install at its own pins.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

SHARED = ("torch", "torchvision", "triton")
SHARED_PREFIXES = ("nvidia-", "cuda-")  # the CUDA wheels torch depends on (GBs): never installed twice


def shared_distributions():
    for dist in metadata.distributions():
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"] or "").lower()
        if name in SHARED or name.startswith(SHARED_PREFIXES):
            yield dist


def main(target: str) -> None:
    folder = Path(__file__).resolve().parent / "envs" / "shared-torch"
    folder.mkdir(parents=True, exist_ok=True)
    for dist in shared_distributions():
        site = Path(dist.locate_file(""))
        for top in {f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] != ".."}:
            link = folder / top
            if not link.exists() and not link.is_symlink():
                link.symlink_to(site / top)
    [site_packages] = Path(target).glob("lib/python*/site-packages")
    (site_packages / "zz_shared_torch.pth").write_text(f"{folder}\n")


if __name__ == "__main__":
    main(sys.argv[1])
