"""A captioner the front ends hold: CoCa writes the sentence, its CLIP half ranks the tags, shape composes.

    with Captioner(CaptionOptions(trigger="jiangnan_style")) as captioner:
        for caption in captioner.caption([image1, image2]):
            print(caption.text)

One pass through the image tower gives both the decoder's image tokens and the pooled embedding the
tags are ranked against. `close()` (or leaving the `with`) drops the model and empties the CUDA
cache, so the host gets its VRAM back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...callbacks import Callbacks
from ...errors import CaptionError
from . import coca
from .shape import MAX_TOKENS, compose_caption
from .tags import Tag, Tagger, load_vocabulary

DEFAULT_MODEL = "coca_ViT-L-14"
DEFAULT_PRETRAINED = "mscoco_finetuned_laion2B-s13B-b90k"


@dataclass
class CaptionOptions:
    model: str = DEFAULT_MODEL  # open_clip CoCa model name (coca_ViT-L-14, coca_ViT-B-32) or a config .json
    pretrained: str = DEFAULT_PRETRAINED  # open_clip pretrained tag, or the path of a local weights file
    trigger: str = ""  # written first in every new caption
    tags: bool = True  # append vocabulary tags ranked by the model's CLIP half
    tag_threshold: float = 0.3  # probability within its category a tag needs (0..1)
    max_tags: int = 6  # at most this many tags per caption
    vocabulary_dir: str = ""  # folder of <category>.txt files replacing the shipped vocabulary
    batch_size: int = 8
    device: str = "auto"  # auto: cuda when there is one, else cpu
    half: bool | None = None  # fp16; None: on cuda only
    num_beams: int = 3  # beam search width; 1 is greedy (fastest)
    max_tokens: int = 30  # longest sentence, in tokens
    max_caption_tokens: int = MAX_TOKENS  # tags are dropped to keep the caption within this
    allow_download: bool = False  # fetch missing weights from the Hugging Face hub (needs the network)
    weights_dir: str = ""  # where dropped-in weights are looked for (default <cache>/captioner)
    hf_cache_dir: str = ""  # Hugging Face cache to look in (default: huggingface_hub's)
    tag_cache_dir: str = ""  # where tag embeddings are cached (default <cache>/caption_tags)

    def __post_init__(self) -> None:
        checks = [
            (self.batch_size >= 1, "batch_size must be at least 1"),
            (0.0 <= self.tag_threshold <= 1.0, "tag_threshold must be between 0 and 1"),
            (self.max_tags >= 0, "max_tags must be 0 or more"),
            (self.num_beams >= 1, "num_beams must be at least 1"),
            (5 <= self.max_tokens <= 75, "max_tokens must be between 5 and 75"),
            (bool(self.model.strip()), "model is empty: use coca_ViT-L-14 or coca_ViT-B-32"),
        ]
        for ok, message in checks:
            if not ok:
                raise CaptionError(f"Caption option: {message}.")


@dataclass
class Caption:
    text: str  # the finished caption: trigger, sentence, tags
    sentence: str  # what the CoCa decoder wrote
    tags: list[Tag] = field(default_factory=list)  # the tags in `text`
    warnings: list[str] = field(default_factory=list)


def check_weights(options: CaptionOptions) -> None:
    """Raise CaptionError (what to download, where to put it) unless the weights are on this machine."""
    from .weights import find_weights

    find_weights(coca.resolve_model_name(options.model), options.pretrained, options.weights_dir or None,
                 options.hf_cache_dir or None, options.allow_download)


class Captioner:
    """Holds the CoCa model (and the tag embeddings) between calls; `close()` gives the memory back."""

    def __init__(self, options: CaptionOptions | None = None, callbacks: Callbacks | None = None) -> None:
        self.options = options or CaptionOptions()
        self.callbacks = callbacks or Callbacks()
        o = self.options
        self.callbacks.on_status(f"loading captioner {o.model} ({Path(o.pretrained).name or o.pretrained})")
        self.model = coca.load_coca(o.model, o.pretrained, o.device, o.half, o.weights_dir or None,
                                    o.hf_cache_dir or None, o.allow_download)
        self.tagger = None
        if o.tags and o.max_tags > 0:
            model = self.model
            self.tagger = Tagger(load_vocabulary(o.vocabulary_dir or None),
                                 lambda phrases: coca.encode_texts(model, phrases), model.logit_scale,
                                 model.weights.key if model.weights else model.name, o.tag_cache_dir or None)
            self.tagger.text_features(self.callbacks.on_status)  # now, not in the middle of the first batch
        where = f"{self.model.device.type}{' fp16' if self.model.half else ''}"
        self.callbacks.on_status(f"captioner ready on {where}")

    def caption(self, images: Sequence[Any]) -> list[Caption]:
        """Captions for PIL images (RGB), in order; batched by `options.batch_size`."""
        out: list[Caption] = []
        size = self.options.batch_size
        for start in range(0, len(images), size):
            out.extend(self._caption_batch(images[start:start + size]))
        return out

    def _caption_batch(self, images: Sequence[Any]) -> list[Caption]:
        import torch

        if self.model is None:
            raise CaptionError("This captioner was closed; create a new one.")
        o = self.options
        pixels = torch.stack([self.model.preprocess(image.convert("RGB")) for image in images])
        latents, tokens = coca.encode_images(self.model, pixels)
        sentences = coca.generate(self.model, tokens, o.max_tokens, o.num_beams)
        ranked = self.tagger.rank(latents, o.tag_threshold) if self.tagger else [[] for _ in images]
        captions = []
        for sentence, tags in zip(sentences, ranked):
            shaped = compose_caption(sentence, tags[:o.max_tags], o.trigger, o.max_caption_tokens)
            captions.append(Caption(shaped.text, sentence, shaped.tags, shaped.warnings))
        return captions

    def close(self) -> None:
        """Release the model and empty the CUDA cache (safe to call twice)."""
        model, self.model, self.tagger = self.model, None, None
        coca.release(model)

    def __enter__(self) -> Captioner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def caption_image(image: Any, options: CaptionOptions | None = None, callbacks: Callbacks | None = None) -> Caption:
    """Caption one image (a PIL image or a path) with a captioner loaded for it and released after."""
    if isinstance(image, (str, Path)):
        from ..images import ImageLoadError, load_image

        try:
            image = load_image(Path(image)).image
        except ImageLoadError as e:
            raise CaptionError(f"{Path(image).name}: {e}") from None
    with Captioner(options, callbacks) as captioner:
        return captioner.caption([image])[0]
