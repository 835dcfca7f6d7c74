"""Errors whose messages tell the user what to fix.

Every error the core raises on purpose derives from `LoraTrainerError`, so a front end can
show `str(err)` as it is and keep tracebacks for real bugs.
"""


class LoraTrainerError(Exception):
    """Base class: the message is written for the user, not the developer."""


class ConfigError(LoraTrainerError):
    """A config key is unknown, mistyped or out of range."""


class DatasetError(LoraTrainerError):
    """The image folder or its captions cannot be used for training."""


class ModelError(LoraTrainerError):
    """The base model (or a LoRA file given as input) cannot be loaded."""


class ResumeError(LoraTrainerError):
    """A resume folder does not belong to this run or is incomplete."""


class TrainingError(LoraTrainerError):
    """Training cannot go on (NaN loss, out of memory) and says how to recover."""


class CaptionError(LoraTrainerError):
    """Captioning cannot start: missing or mismatched captioner weights, no images to caption."""


def in_field_words(message: str, fields: "dict[str, str]") -> str:
    """`message` with the config keys a front end shows under other names replaced by those names
    (`{"train_data_dir": "Image folder"}`: "train_data_dir not found" → "Image folder not found").
    The CLI keeps the config keys; the tab and the ComfyUI nodes name their own fields."""
    import re

    if not fields:
        return message
    pattern = re.compile(r"(?<![\w.])(" + "|".join(re.escape(k) for k in sorted(fields, key=len, reverse=True))
                         + r")(?![\w])")
    return pattern.sub(lambda m: fields[m.group(1)], message)
