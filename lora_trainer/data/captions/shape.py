"""The shape of a caption, as the seed documents recommend it:

    <trigger>, <the sentence: subject and scene>, <subject tags>, <scene tags>, <lighting tags>, <style tags>

- the trigger word comes first (moved there when the text already holds it elsewhere);
- the sentence says what is in the picture; tags add the scene, the lighting and the style, in
  that order, best first within each; a tag whose words the sentence already says is left out;
- no vague words: "beautiful", "nice view", "masterpiece" say nothing a LoRA can learn, and they
  pull every image towards the same generic look;
- at most 75 CLIP tokens (SD's text encoders see 77, start and end included): the tags with the
  lowest scores are dropped until it fits, and a caption still over 75 gets a warning.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

MAX_TOKENS = 75
SLOTS = ("subject", "scene", "lighting", "style")
# Vocabulary category -> slot; a category not listed here (a user's own file) is a style tag.
CATEGORY_SLOTS = {
    "subject": "subject", "activity": "subject", "material": "subject",
    "scene": "scene", "time": "scene", "weather": "scene",
    "lighting": "lighting",
}
# A comma-separated item that is one of these goes as a whole.
VAGUE_PHRASES = frozenset({
    "nice view", "good view", "great view", "beautiful view", "beautiful scenery", "nice scenery",
    "nice picture", "good picture", "nice image", "beautiful image", "beautiful picture", "nice photo",
    "masterpiece", "best quality", "high quality", "good quality", "top quality", "amazing quality",
    "ultra detailed", "award winning", "trending on artstation",
})
# Words that praise instead of describe; removed wherever they stand.
VAGUE_WORDS = frozenset({
    "beautiful", "beautifully", "nice", "amazing", "stunning", "gorgeous", "awesome", "lovely", "wonderful",
    "breathtaking", "fantastic", "incredible", "magnificent", "spectacular", "perfect", "pretty", "very",
    "really", "epic", "superb", "marvelous", "marvellous", "exquisite",
})
_ARTICLES = ("a", "an")


class TagLike(Protocol):
    phrase: str
    category: str
    score: float


@dataclass
class ShapedCaption:
    text: str
    warnings: list[str] = field(default_factory=list)
    tags: list = field(default_factory=list)  # the tags in `text`, best first
    dropped_tags: list[str] = field(default_factory=list)  # left out to stay within 75 tokens


def remove_vague_words(text: str) -> str:
    """Drop vague items ("nice view") and vague words ("a beautiful old bridge" -> "an old bridge")."""
    items = []
    for item in text.split(","):
        words = item.split()
        bare = [w.strip(".!?;:").lower() for w in words]
        if not words or " ".join(bare) in VAGUE_PHRASES or all(w in VAGUE_WORDS for w in bare):
            continue
        kept: list[str] = []
        fix_article = after_vague = False
        for word, low in zip(words, bare):
            if low in VAGUE_WORDS:
                if kept and kept[-1].lower() == "and":  # "quiet and beautiful": the "and" goes too
                    kept.pop()
                fix_article = fix_article or bool(kept and kept[-1].lower() in _ARTICLES)
                after_vague = True
                continue
            if low == "and" and after_vague and (not kept or kept[-1].lower() in _ARTICLES):
                continue  # "a beautiful and quiet village": the "and" went with "beautiful"
            if fix_article and kept and kept[-1].lower() in _ARTICLES:
                kept[-1] = _article(kept[-1], word)
            fix_article = after_vague = False
            kept.append(word)
        if kept:
            items.append(" ".join(kept))
    return ", ".join(items)


def _article(article: str, next_word: str) -> str:
    right = "an" if next_word[:1].lower() in "aeiou" else "a"
    return right.capitalize() if article[:1].isupper() else right


def put_trigger_first(text: str, trigger: str) -> str:
    """`trigger, text` with any other occurrence of the trigger (as a whole word) taken out of `text`."""
    trigger = trigger.strip()
    if not trigger:
        return text.strip()
    rest = remove_trigger(text, trigger)
    return f"{trigger}, {rest}" if rest else trigger


def remove_trigger(text: str, trigger: str) -> str:
    """`text` without the trigger (as a whole word, any case), and without the empty parts it leaves."""
    trigger = trigger.strip()
    if not trigger:
        return text.strip()
    pattern = re.compile(rf"(?<![\w-]){re.escape(trigger)}(?![\w-])", re.IGNORECASE)
    items = [re.sub(r"\s+", " ", pattern.sub("", item)).strip() for item in text.split(",")]
    return ", ".join(i for i in items if i)


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def clip_token_count(text: str) -> int:
    """Tokens the CLIP text encoder sees for `text`, start and end tokens not counted."""
    return len(_tokenizer().encode(text))


def clip_cut(text: str, limit: int = MAX_TOKENS) -> tuple[int, str, str]:
    """(token count, the text the encoder reads, the text it never sees) when `text` is cut at `limit` tokens."""
    tokenizer = _tokenizer()
    ids = tokenizer.encode(text)
    if len(ids) <= limit:
        return len(ids), text, ""
    return len(ids), tokenizer.decode(ids[:limit]).strip(), tokenizer.decode(ids[limit:]).strip()


def length_warning(text: str, limit: int = MAX_TOKENS) -> str | None:
    count = clip_token_count(text)
    if count <= limit:
        return None
    return (f"{count} CLIP tokens, over the {limit} a Stable Diffusion text encoder sees: the end is cut off in "
            "training; shorten it")


def slot_of(category: str) -> str:
    return CATEGORY_SLOTS.get(category, "style")


def compose_caption(sentence: str, tags: Sequence[TagLike] = (), trigger: str = "",
                    max_tokens: int = MAX_TOKENS) -> ShapedCaption:
    """Trigger, sentence, then the tags by slot (subject, scene, lighting, style): see the module docstring."""
    sentence = remove_vague_words(sentence.strip().rstrip("."))
    said = set(_words(f"{trigger} {sentence}"))
    chosen: list[TagLike] = []
    for tag in tags:
        words = _words(tag.phrase)
        if not words or set(words) <= said or not remove_vague_words(tag.phrase):
            continue
        chosen.append(tag)
        said.update(words)
    result = ShapedCaption(_join(trigger, sentence, chosen))
    while chosen and clip_token_count(result.text) > max_tokens:
        weakest = min(chosen, key=lambda t: t.score)
        chosen.remove(weakest)
        result.dropped_tags.append(weakest.phrase)
        result.text = _join(trigger, sentence, chosen)
    result.tags = list(chosen)
    warning = length_warning(result.text, max_tokens)
    if warning:
        result.warnings.append(warning)
    return result


def _join(trigger: str, sentence: str, tags: Sequence[TagLike]) -> str:
    ordered = sorted(tags, key=lambda t: (SLOTS.index(slot_of(t.category)), -t.score))
    body = ", ".join(p for p in [sentence, *(t.phrase for t in ordered)] if p)
    return put_trigger_first(body, trigger) if trigger.strip() else body


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())
