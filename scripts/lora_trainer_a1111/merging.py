"""Merge into checkpoint, the WebUI's side: where its checkpoints live and how its checkpoint list learns of a new one
(read in A1111 1.10.1 and Forge dfdcbab6, where these are the same).

- The folder is `--ckpt-dir` when set, else `sd_models.model_path` (models/Stable-diffusion): where the WebUI's own
  Checkpoint Merger writes (modules/extras.py run_modelmerger: `shared.cmd_opts.ckpt_dir or sd_models.model_path`),
  and both are folders `sd_models.list_models()` scans.
- The list is refreshed as the checkpoint dropdown's refresh button does it: its `refresh` is
  `shared_items.refresh_checkpoints` (shared_options.py, option sd_model_checkpoint; Forge's
  main_entry.refresh_models calls the same), which is `sd_models.list_models()`. The button is then pressed in the
  page too (javascript/lora_trainer.js), so the dropdown there shows the new file without a reload.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .webui import webui_modules


def checkpoint_dir() -> Path:
    shared, sd_models, _ = webui_modules()
    return Path(getattr(shared.cmd_opts, "ckpt_dir", None) or sd_models.model_path)


def refresh_checkpoints() -> None:
    from modules import shared_items

    shared_items.refresh_checkpoints()


def listed_title(checkpoint: Path) -> Optional[str]:
    """The title the WebUI lists `checkpoint` under (as its checkpoint dropdown shows it), or None."""
    sd_models = webui_modules()[1]
    target = Path(checkpoint).resolve()
    for info in list(sd_models.checkpoints_list.values()):
        if Path(info.filename).resolve() == target:
            return str(info.title)
    return None


def after_merge(checkpoint: Path) -> str:
    """Refresh the WebUI's checkpoint list; say under which title the new checkpoint is listed, or warn."""
    try:
        refresh_checkpoints()
        title = listed_title(checkpoint)
    except Exception as err:
        import traceback

        traceback.print_exc()  # the details go to the console, the tab gets one line
        return f"Warning: the checkpoint list was not refreshed (press its refresh button): {type(err).__name__}: {err}"
    if title is None:
        return (f"Warning: the WebUI does not list {Path(checkpoint).name} after a refresh (its checkpoint folders: "
                "--ckpt-dir and models/Stable-diffusion).")
    return f'In the WebUI\'s checkpoint list as "{title}".'
