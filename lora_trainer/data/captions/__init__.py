"""The captions stage: caption files, and writing captions for a folder of images.

- `files`: reading and writing metadata.csv / metadata.jsonl / .txt sidecars (formats and precedence);
- `weights`, `coca`: the open_clip CoCa captioner, its weights found without the network;
- `tags`: vocabulary tags ranked by the same model's CLIP half (embeddings cached on disk);
- `shape`: trigger first, subject / scene / lighting / style, no vague words, 75 CLIP tokens;
- `captioner`: `Captioner` and `caption_image`, what a front end holds;
- `folder`: `caption_folder` (a generator of per-image results) and `run_captioning`.

Importing this package imports neither torch nor open_clip.
"""

from .captioner import DEFAULT_MODEL, DEFAULT_PRETRAINED, Caption, CaptionOptions, Captioner, caption_image
from .files import (
    CAPTION_FORMATS,
    CAPTION_KEYS,
    NAME_KEYS,
    CaptionProblem,
    CaptionSet,
    normalize_caption,
    normalize_name,
    read_captions,
    write_captions,
)
from .folder import CaptionReport, CaptionResult, caption_folder, resolve_output, run_captioning
from .shape import clip_token_count, compose_caption, put_trigger_first, remove_vague_words
from .tags import Tag, Tagger, Vocabulary, load_vocabulary, rank_tags
from .weights import MissingWeights, available_weights

__all__ = [
    "CAPTION_FORMATS", "CAPTION_KEYS", "NAME_KEYS", "CaptionProblem", "CaptionSet", "normalize_caption",
    "normalize_name", "read_captions", "write_captions",
    "DEFAULT_MODEL", "DEFAULT_PRETRAINED", "Caption", "CaptionOptions", "Captioner", "caption_image",
    "CaptionReport", "CaptionResult", "caption_folder", "resolve_output", "run_captioning",
    "clip_token_count", "compose_caption", "put_trigger_first", "remove_vague_words",
    "Tag", "Tagger", "Vocabulary", "load_vocabulary", "rank_tags", "MissingWeights", "available_weights",
]
