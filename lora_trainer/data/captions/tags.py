"""Tags: the CLIP half of the CoCa model ranks a vocabulary that ships with the project.

The vocabulary is `captions/vocabulary/<category>.txt`: one short phrase per line, `#` starts a
comment. A folder of the same shape can replace it (`vocabulary_dir`, CLI `--vocabulary DIR`).

The text embedding of every phrase is computed once per model and cached on disk in
`<cache_root>/caption_tags/`, keyed by the model name, its weights (pretrained tag, or the file's
name, size and time) and a hash of the vocabulary: editing a phrase makes a new cache entry.

Ranking, per image and per category: softmax over the category's phrases of
`logit_scale * cosine(image, phrase)`, the way CLIP scores zero-shot labels. A phrase is kept when
its probability reaches `threshold`, best first, at most `top_k` per category. Judging each
category on its own keeps a 1,000-phrase subject list and a 60-phrase lighting list comparable:
"0.3" means "clearly the best of its kind" in both.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import CaptionError
from ...files import atomic_write_with
from ...model.tokenizers import cache_root

VOCABULARY_DIR = Path(__file__).resolve().parent / "vocabulary"
DEFAULT_TOP_K = {"subject": 2}  # other categories: 1
_ENCODE_BATCH = 256


@dataclass(frozen=True)
class Vocabulary:
    categories: tuple[str, ...]  # file stems, in sorted order
    phrases: tuple[str, ...]
    category_index: tuple[int, ...]  # per phrase, its index in `categories`

    def digest(self) -> str:
        payload = json.dumps([self.categories, self.phrases, self.category_index], ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]

    def of(self, category: str) -> list[str]:
        c = self.categories.index(category)
        return [p for p, i in zip(self.phrases, self.category_index) if i == c]


@dataclass(frozen=True)
class Tag:
    phrase: str
    category: str
    score: float  # probability within its category, 0..1


def load_vocabulary(folder: str | Path | None = None) -> Vocabulary:
    """Read `<category>.txt` files (one phrase a line, duplicates within a category dropped)."""
    folder = Path(folder).expanduser() if folder else VOCABULARY_DIR
    files = sorted(folder.glob("*.txt")) if folder.is_dir() else []
    if not files:
        raise CaptionError(f"No vocabulary files (<category>.txt, one phrase a line) in {folder}.")
    categories, phrases, index = [], [], []
    for c, path in enumerate(files):
        categories.append(path.stem)
        seen = set()
        for line in path.read_text(encoding="utf-8").splitlines():
            phrase = re.sub(r"\s+", " ", line.split("#", 1)[0]).strip()
            if phrase and phrase.lower() not in seen:
                seen.add(phrase.lower())
                phrases.append(phrase)
                index.append(c)
    return Vocabulary(tuple(categories), tuple(phrases), tuple(index))


class Tagger:
    """Ranks the vocabulary against image embeddings; the phrase embeddings are cached on disk."""

    def __init__(self, vocabulary: Vocabulary, encode_text: Callable[[list[str]], Any], logit_scale: float,
                 cache_key: str, cache_dir: str | Path | None = None) -> None:
        """encode_text: phrases -> embeddings (N, D); cache_key names the model and its weights."""
        self.vocabulary = vocabulary
        self.encode_text = encode_text
        self.logit_scale = logit_scale
        self.cache_path = text_features_path(cache_key, vocabulary, cache_dir)
        self._features = None

    def text_features(self, on_status: Callable[[str], None] | None = None) -> Any:
        """Normalized phrase embeddings (N, D) float32 on the CPU: from the cache, else computed and saved."""
        if self._features is None:
            self._features = _read_features(self.cache_path, len(self.vocabulary.phrases))
        if self._features is None:
            if on_status:
                on_status(f"computing tag embeddings for {len(self.vocabulary.phrases):,} phrases (once per model)")
            self._features = self._compute()
            _write_features(self.cache_path, self._features)
        return self._features

    def _compute(self) -> Any:
        import torch

        phrases = list(self.vocabulary.phrases)
        with torch.no_grad():
            chunks = [self.encode_text(phrases[i:i + _ENCODE_BATCH]).float().cpu()
                      for i in range(0, len(phrases), _ENCODE_BATCH)]
        features = torch.nn.functional.normalize(torch.cat(chunks), dim=-1)
        return features.half().float().contiguous()  # as the cache stores it: same ranking on every run

    def rank(self, image_features: Any, threshold: float = 0.3, top_k: Mapping[str, int] | int | None = None,
             on_status: Callable[[str], None] | None = None) -> list[list[Tag]]:
        return rank_tags(image_features, self.text_features(on_status), self.vocabulary, self.logit_scale,
                         threshold, top_k)


def rank_tags(image_features: Any, text_features: Any, vocabulary: Vocabulary, logit_scale: float,
              threshold: float = 0.3, top_k: Mapping[str, int] | int | None = None) -> list[list[Tag]]:
    """Per image, the tags that win their category (see the module docstring), best first overall."""
    import torch

    image = torch.nn.functional.normalize(image_features.float().cpu(), dim=-1)
    logits = logit_scale * image @ text_features.float().T  # (images, phrases)
    category = torch.tensor(vocabulary.category_index)
    results: list[list[Tag]] = [[] for _ in range(image.shape[0])]
    for c, name in enumerate(vocabulary.categories):
        members = (category == c).nonzero().squeeze(1)
        if members.numel() == 0:
            continue
        k = top_k if isinstance(top_k, int) else {**DEFAULT_TOP_K, **(top_k or {})}.get(name, 1)
        probs = logits[:, members].softmax(dim=-1)
        best, where = probs.topk(min(max(k, 0), members.numel()), dim=-1)
        for row in range(image.shape[0]):
            for p, j in zip(best[row].tolist(), where[row].tolist()):
                if p >= threshold:
                    results[row].append(Tag(vocabulary.phrases[int(members[j])], name, p))
    return [sorted(tags, key=lambda t: -t.score) for tags in results]


def text_features_path(cache_key: str, vocabulary: Vocabulary, cache_dir: str | Path | None = None) -> Path:
    folder = Path(cache_dir) if cache_dir else cache_root() / "caption_tags"
    key = hashlib.sha256(f"{cache_key}\n{vocabulary.digest()}".encode("utf-8")).hexdigest()[:16]
    model = re.sub(r"[^A-Za-z0-9_.-]+", "_", cache_key.split("/", 1)[0])[:60]
    return folder / f"{model}-{key}.safetensors"


def _read_features(path: Path, count: int) -> Any:
    if not path.is_file():
        return None
    try:
        from safetensors.torch import load_file

        features = load_file(str(path))["text_features"].float()
    except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed
        return None
    return features if features.shape[0] == count else None


def _write_features(path: Path, features: Any) -> None:
    from safetensors.torch import save_file

    try:
        atomic_write_with(path, lambda tmp: save_file({"text_features": features.half()}, str(tmp)))
    except OSError:  # a read-only cache only costs the next run the same computation
        pass

