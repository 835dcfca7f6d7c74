"""Caption Folder: write a caption for every image of a folder that has none (or all, with overwrite)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..lora_trainer.data.captions import (DEFAULT_PRETRAINED, CaptionOptions, CaptionReport, MissingWeights,
                                     available_weights, caption_folder, read_captions)
from ..lora_trainer.data.captions.captioner import DEFAULT_MODEL
from .fingerprint import folder_fingerprint
from .host import ComfyCallbacks, ComfyHost
from .inputs import FOLDER_FIELDS, node_words, tooltip

MODELS = [DEFAULT_MODEL, "coca_ViT-B-32"]
PREVIEW_LINES = 20
AUTO = "(auto)"  # the default tag's weights from the lora_trainer or Hugging Face cache


def weights_folder() -> Path:
    """Where ComfyUI users drop captioner weights: models/lora_trainer/captioner/ (made on first use)."""
    import folder_paths

    return Path(folder_paths.models_dir) / "lora_trainer" / "captioner"


def pretrained_for(choice: str) -> str:
    """A weights choice as the captioner takes it: the default tag for AUTO, else the file's path."""
    return DEFAULT_PRETRAINED if choice in (AUTO, "") else str(weights_folder() / choice)


def weight_choices() -> list:
    """AUTO, then every weights file found: under models/lora_trainer/captioner/ by its relative name."""
    folder = weights_folder()
    # no pretrained tag: the Hugging Face cache look-up imports open_clip (seconds) on every /object_info,
    # and AUTO finds that file anyway
    found = [p for m in MODELS for p in available_weights(m, "", (folder,))]
    names = [p.relative_to(folder).as_posix() if p.is_relative_to(folder) else str(p) for p in found]
    return [AUTO, *dict.fromkeys(names)]


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
            "optional": {
                "weights": (weight_choices(), {"default": AUTO, "tooltip": "The captioner's weights file: put it "
                            "in models/lora_trainer/captioner/ (press R to list it). (auto): the model's default "
                            "weights from the lora_trainer or Hugging Face cache."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, folder: Any = None, **_: Any) -> str:
        return folder_fingerprint(folder)

    def caption(self, folder: str, trigger_word: str, model: str, overwrite: bool, weights: str = AUTO,
                unique_id: Optional[str] = None) -> dict:
        callbacks = ComfyCallbacks(unique_id)
        report = CaptionReport(Path(folder), Path(folder), "csv")
        pretrained = pretrained_for(weights)
        options = CaptionOptions(model=model, trigger=trigger_word, pretrained=pretrained)
        with node_words(FOLDER_FIELDS):
            try:
                if self.captioner is None:
                    ComfyHost().free_gpu()  # the captioner needs the memory ComfyUI's models hold
                for _ in caption_folder(folder, options=options, overwrite=overwrite, callbacks=callbacks,
                                        report=report, captioner=self.captioner):
                    pass
            except MissingWeights as e:
                e.args = (e.in_words(weights_folder(), field="weights"),)
                raise
        callbacks.raise_if_stopped("the captions written so far are saved; queue again for the rest")
        text = preview(folder, report)
        return {"ui": {"text": [text]}, "result": (str(Path(folder)), text)}  # ui.text: shown on the node


def preview(folder: str, report: CaptionReport) -> str:
    captions = read_captions(Path(folder)).captions
    lines = [report.summary(), ""] + [f"{name}: {text}" for name, text in list(captions.items())[:PREVIEW_LINES]]
    if len(captions) > PREVIEW_LINES:
        lines.append(f"... and {len(captions) - PREVIEW_LINES} more")
    return "\n".join(lines)
