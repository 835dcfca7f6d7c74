"""The LoRA's extra-networks card: `<name>.json` (activation text, preferred weight, SD version) and its
preview picture, the last sample grid or else the first training image that decodes. Test's best strength
becomes the card's preferred weight (`set_preferred_weight`), which Merge into checkpoint starts from
(`preferred_weight`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from lora_trainer.files import atomic_write_text, atomic_write_with
from lora_trainer.ui.session import PREFERRED_STRENGTH

PREFERRED_KEY = "preferred weight"  # extensions-builtin/Lora/ui_edit_user_metadata.py (A1111 1.10, Forge)
# ui_edit_user_metadata.py's "sd version" choices (Forge's add Flux)
SD_VERSION = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL", "flux": "Flux"}
PREVIEW_SIDE = 1024  # the card's preview: a training photo may be 20 MB, the Lora pane shows a thumbnail


def write_card(lora_path: Path, trigger_word: str, family: str, preview: Any = None, description: str = "") -> Path:
    """The extra-networks card: `<name>.json` (ui_edit_user_metadata keys) and `<name>.preview.png`."""
    lora_path = Path(lora_path)
    card = {"description": description, "sd version": SD_VERSION.get(family, "Unknown"),
            "activation text": trigger_word, PREFERRED_KEY: PREFERRED_STRENGTH, "negative text": "", "notes": ""}
    path = atomic_write_text(lora_path.with_suffix(".json"), json.dumps(card, indent=4))
    if preview is not None:
        from PIL import Image

        image = preview if isinstance(preview, Image.Image) else Image.open(preview)
        atomic_write_with(lora_path.with_suffix(".preview.png"), lambda tmp: image.save(tmp, format="PNG"))
    return path


def set_preferred_weight(lora_path: Path, weight: float) -> Path:
    """The card's preferred weight set to `weight`, everything else in it (edited in the WebUI or not) kept;
    written atomically. A LoRA without a card gets one holding just that."""
    path = Path(lora_path).with_suffix(".json")
    card = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if not isinstance(card, dict):
        card = {}
    card[PREFERRED_KEY] = float(weight)
    return atomic_write_text(path, json.dumps(card, indent=4))


def preferred_weight(lora_path: Path) -> Optional[float]:
    """The card's preferred weight, or None when there is no card or it holds none (0 is "none" to the WebUI too:
    ui_extra_networks_lora.py falls back to the default multiplier)."""
    path = Path(lora_path).with_suffix(".json")
    card = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    weight = card.get(PREFERRED_KEY) if isinstance(card, dict) else None
    try:
        return float(weight) or None
    except (TypeError, ValueError):
        return None


def lora_family(lora_path: Path) -> str:
    """sd1, sd2, sdxl or flux, from the metadata the file was written with (its tensors are not read)."""
    from lora_trainer.adapters.export import read_lora
    from lora_trainer.adapters.merge import lora_family as family_of

    return family_of(read_lora(Path(lora_path), with_tensors=False)[1], {}) or "sd1"


def preview_image(sample: Optional[Path], folder: str, skipped: Any = ()) -> Any:
    """The card's picture: the last sample grid, else the first training image that decodes (the run's
    skipped ones never), as a PIL image at most PREVIEW_SIDE px; None when there is none."""
    from lora_trainer.data.images import ImageLoadError, list_images, load_image

    candidates = [Path(sample)] if sample else []
    left_out = {name for name, _ in skipped}
    if Path(folder).is_dir():
        candidates += [p for p in list_images(Path(folder)) if p.name not in left_out]
    for path in candidates:
        try:
            image = load_image(path).image  # decoded in full: a truncated file fails here, not in save()
        except ImageLoadError:
            continue
        image.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
        return image
    return None
