"""Caption Folder: write a caption for every image of a folder that has none (or all, with overwrite)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..lora_trainer.captions import CaptionOptions, CaptionReport, caption_folder, read_captions
from ..lora_trainer.captions.captioner import DEFAULT_MODEL
from .fingerprint import folder_fingerprint
from .host import ComfyCallbacks, ComfyHost
from .inputs import tooltip

MODELS = [DEFAULT_MODEL, "coca_ViT-B-32"]
PREVIEW_LINES = 20


class CaptionFolder:
    DESCRIPTION = ("Caption the images of a folder with the CoCa captioner (metadata.csv, the format the "
                   "trainer reads). Captions already there are kept unless overwrite is on; replaced ones are "
                   "backed up.")
    CATEGORY = "LoRA Trainer"
    FUNCTION = "caption"
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("dataset_path", "captions")
    OUTPUT_TOOLTIPS = ("The folder, to connect to Train LoRA's dataset_path.",
                       "A summary and the first captions, to check before training.")

    captioner: Any = None  # a loaded Captioner to use instead of loading one (tests pass a stand-in)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "folder": ("STRING", {"default": "", "tooltip": tooltip("train_data_dir")}),
                "trigger_word": ("STRING", {"default": "", "tooltip": tooltip("trigger_word")}),
                "model": (MODELS, {"default": DEFAULT_MODEL, "tooltip": "Captioner: coca_ViT-L-14 (better) or "
                                   "coca_ViT-B-32 (faster, less memory). Weights must be on this machine."}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Caption every image again; the "
                                          "previous captions are saved to a .bak file first."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, folder: Any = None, **_: Any) -> str:
        return folder_fingerprint(folder)

    def caption(self, folder: str, trigger_word: str, model: str, overwrite: bool,
                unique_id: Optional[str] = None) -> tuple:
        callbacks = ComfyCallbacks(unique_id)
        report = CaptionReport(Path(folder), Path(folder), "csv")
        options = CaptionOptions(model=model, trigger=trigger_word)
        if self.captioner is None:
            ComfyHost().free_gpu()  # the captioner needs the memory ComfyUI's models hold
        for _ in caption_folder(folder, options=options, overwrite=overwrite, callbacks=callbacks, report=report,
                                captioner=self.captioner):
            pass
        callbacks.raise_if_stopped("the captions written so far are saved; queue again for the rest")
        text = preview(folder, report)
        return {"ui": {"text": [text]}, "result": (str(Path(folder)), text)}  # ui.text: shown on the node


def preview(folder: str, report: CaptionReport) -> str:
    captions = read_captions(Path(folder)).captions
    lines = [report.summary(), ""] + [f"{name}: {text}" for name, text in list(captions.items())[:PREVIEW_LINES]]
    if len(captions) > PREVIEW_LINES:
        lines.append(f"... and {len(captions) - PREVIEW_LINES} more")
    return "\n".join(lines)
