"""The CoCa captioner: an open_clip model built from its config, its weights read safely, sentences decoded.

The model is built by open_clip (`create_model_and_transforms` with no pretrained tag, so open_clip
never reaches for the network) and the weights found by `weights.find_weights` are read here:
safetensors, or `torch.load(weights_only=True)`: a pickle cannot run code. On a GPU the model is
built in open_clip's fp16 precision and run under autocast.

Sentences come from our own decoding loop (beam search; greedy with one beam), not open_clip's
`generate`: that needs transformers' generation classes, which transformers 5 removed (open_clip
3.3 then refuses to generate), and its arguments differ between open_clip 2.20 and 3.x. The loop
uses only what every version has: `_encode_image` (the pooled image embedding, used for tags, and
the image tokens), the `text` tower and the `text_decoder`.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ...errors import CaptionError
from .weights import WeightsFile, find_weights

# coca_ViT-B-32's layout at toy size, for tests and benchmarks (no weights exist for it anywhere);
# vocab_size must stay CLIP's 49408, the tokenizer's.
TINY_COCA = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16,
                   "attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True},
    "text_cfg": {"context_length": 76, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                 "embed_cls": True, "output_tokens": True},
    "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                       "attn_pooler_heads": 2},
    "custom_text": True,
}

SOT, EOT = 49406, 49407  # CLIP's <start_of_text> and <end_of_text>


@dataclass
class CocaModel:
    model: Any  # open_clip CoCa, eval mode, on `device`
    preprocess: Callable  # PIL image -> tensor (open_clip's eval transform)
    tokenizer: Callable  # list of str -> token tensor (open_clip's, for this model)
    name: str
    weights: WeightsFile | None
    device: Any  # torch.device
    half: bool

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().float().exp().clamp(max=100.0))

    def autocast(self):
        import torch

        if self.half:
            return torch.autocast(self.device.type, dtype=torch.float16)
        return contextlib.nullcontext()


def resolve_model_name(model: str) -> str:
    """An open_clip model name, or the path of an open_clip model config (.json), registered under its stem."""
    import open_clip

    path = Path(model).expanduser()
    if path.suffix.lower() == ".json" and path.is_file():
        open_clip.add_model_config(str(path))
        return path.stem
    if model not in open_clip.list_models():
        coca = [m for m in open_clip.list_models() if m.startswith("coca_")]
        raise CaptionError(f"Unknown captioner model {model!r}: use one of {', '.join(coca)}, "
                           "or the path of an open_clip model config (.json).")
    return model


def load_coca(model: str, pretrained: str, device: str = "auto", half: bool | None = None,
              weights_dir: str | None = None, hf_cache_dir: str | None = None,
              allow_download: bool = False) -> CocaModel:
    """Build `model` and load its weights (see `weights.find_weights`); raise CaptionError when they are missing."""
    import open_clip
    import torch

    name = resolve_model_name(model)
    weights = find_weights(name, pretrained, weights_dir, hf_cache_dir, allow_download)  # fails before any work
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    half = dev.type == "cuda" if half is None else half
    with _quiet_open_clip():
        net, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=None, precision="fp16" if half else "fp32", device=dev)
    if not hasattr(net, "text_decoder"):
        raise CaptionError(f"{name} is not a CoCa model: only CoCa models (coca_ViT-L-14, coca_ViT-B-32) write "
                           "sentences.")
    load_weights(net, weights.path, name)
    net.eval().requires_grad_(False)
    return CocaModel(net, preprocess, open_clip.get_tokenizer(name), name, weights, dev, half)


@contextlib.contextmanager
def _quiet_open_clip():
    """Hide open_clip's "No pretrained weights loaded" warning: we load them ourselves right after."""
    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "pretrained weights" not in record.getMessage()

    root, drop = logging.getLogger(), _Drop()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def read_state_dict(path: Path) -> dict:
    """The tensors of a weights file; pickles are read with weights_only=True."""
    import torch

    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path))
        else:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated file, not a checkpoint, pickle with code in it ...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CaptionError(f"Cannot read the captioner weights {path}: {reason}. Download the file again.") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not data:
        raise CaptionError(f"{path} holds no model weights. Download the file again.")
    if next(iter(data)).startswith("module."):  # saved from DistributedDataParallel
        data = {k[len("module."):]: v for k, v in data.items()}
    return data


def load_weights(net: Any, path: Path, name: str) -> None:
    """Load a state dict into `net` after open_clip's own fix-ups for older checkpoints."""
    from open_clip import model as oc_model

    state = read_state_dict(path)
    if "positional_embedding" in state and not hasattr(net, "positional_embedding"):
        state = oc_model.convert_to_custom_text_state_dict(state)
    if "logit_scale" in state and state["logit_scale"].ndim != net.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(net.logit_scale.shape)
    oc_model.resize_pos_embed(state, net)
    if hasattr(oc_model, "resize_text_pos_embed"):  # open_clip >= 2.24
        oc_model.resize_text_pos_embed(state, net)
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), "")
        raise CaptionError(f"{path.name} does not fit the {name} model ({detail[:160]}). "
                           "Choose the --model these weights belong to.") from None
    if result.missing_keys:
        shown = ", ".join(result.missing_keys[:3])
        raise CaptionError(f"{path.name} is not a {name} weights file: {len(result.missing_keys)} weights missing "
                           f"({shown}, ...). Choose the --model these weights belong to.")


def encode_images(coca: CocaModel, pixels: Any) -> tuple[Any, Any]:
    """(normalized pooled embeddings as float32, image tokens for the decoder) of a preprocessed batch."""
    import torch

    with torch.no_grad(), coca.autocast():
        pixels = pixels.to(coca.device, dtype=torch.float16 if coca.half else torch.float32)
        latents, tokens = coca.model._encode_image(pixels)
    return latents.float(), tokens


def encode_texts(coca: CocaModel, texts: list[str]) -> Any:
    """Normalized text embeddings (float32, on the model's device) from the CLIP half's text tower."""
    import torch

    with torch.no_grad(), coca.autocast():
        latents = coca.model.encode_text(coca.tokenizer(texts).to(coca.device))
    return torch.nn.functional.normalize(latents.float(), dim=-1)


def generate(coca: CocaModel, image_tokens: Any, max_tokens: int = 30, num_beams: int = 3, min_tokens: int = 4,
             no_repeat_ngram: int = 3) -> list[str]:
    """One sentence per image: beam search over the CoCa decoder (greedy when num_beams is 1)."""
    import torch

    batch, beams = image_tokens.shape[0], max(1, num_beams)
    tokens = image_tokens.repeat_interleave(beams, dim=0)
    seqs = torch.full((batch * beams, 1), SOT, dtype=torch.long, device=tokens.device)
    scores = torch.zeros(batch, beams, device=tokens.device)
    scores[:, 1:] = float("-inf")  # every beam starts as the same empty sentence: expand only the first
    done = torch.zeros(batch * beams, dtype=torch.bool, device=tokens.device)
    lengths = torch.zeros(batch * beams, device=tokens.device)
    with torch.no_grad(), coca.autocast(), _last_position_only(coca.model.text_decoder) as projection:
        for step in range(max_tokens):
            _, token_embs = coca.model.text(seqs)
            hidden = coca.model.text_decoder(tokens, token_embs)[:, -1]
            logp = torch.log_softmax((hidden @ projection).float(), dim=-1)
            if step < min_tokens:
                logp[:, EOT] = float("-inf")
            elif step == max_tokens - 1:  # the last step ends every sentence
                end = logp[:, EOT].clone()
                logp.fill_(float("-inf"))
                logp[:, EOT] = end
            _ban_repeats(logp, seqs, no_repeat_ngram)
            logp[done] = float("-inf")
            logp[done, EOT] = 0.0  # a finished sentence stays as it is
            vocab = logp.shape[1]
            top, index = (scores.reshape(-1, 1) + logp).reshape(batch, beams * vocab).topk(beams, dim=1)
            rows = (torch.arange(batch, device=seqs.device).unsqueeze(1) * beams + index // vocab).reshape(-1)
            new = (index % vocab).reshape(-1, 1)
            seqs, scores = torch.cat([seqs[rows], new], dim=1), top
            lengths = lengths[rows] + (~done[rows]).float()
            done = done[rows] | (new.squeeze(1) == EOT)
            if bool(done.all()):
                break
    best = (scores / lengths.reshape(batch, beams).clamp(min=1)).argmax(dim=1)
    chosen = seqs.reshape(batch, beams, -1)[torch.arange(batch), best]
    return [decode(row.tolist()) for row in chosen]


@contextlib.contextmanager
def _last_position_only(decoder: Any) -> Iterator[Any]:
    """Yield the decoder's vocabulary projection, taken off it meanwhile (every open_clip version skips a None).

    The decoder would project every position onto the 49,408-token vocabulary at every step; only
    the last one is needed, and for small models that projection is most of the time.
    """
    projection = decoder.text_projection
    decoder.text_projection = None
    try:
        yield projection
    finally:
        decoder.text_projection = projection


def _ban_repeats(logp: Any, seqs: Any, n: int) -> None:
    """No n-gram twice in one sentence (stops greedy loops like "a house with a house with")."""
    if n < 2 or seqs.shape[1] < n:
        return
    for row, seq in enumerate(seqs.tolist()):
        prefix = tuple(seq[len(seq) - n + 1:])
        for i in range(len(seq) - n + 1):
            if tuple(seq[i:i + n - 1]) == prefix:
                logp[row, seq[i + n - 1]] = float("-inf")


def decode(ids: list[int]) -> str:
    """Token ids (starting at <start_of_text>) -> a clean lower-case sentence without the final period."""
    import open_clip
    import torch

    ids = [i for i in ids if i != SOT]
    ids = ids[:ids.index(EOT)] if EOT in ids else ids
    text = open_clip.decode(torch.tensor(ids, dtype=torch.long)) if ids else ""
    text = re.sub(r"\s+([.,!?;:])", r"\1", text.replace("<start_of_text>", "").replace("<end_of_text>", ""))
    return re.sub(r"\s+", " ", text).strip().rstrip(".").strip()


def release(coca: CocaModel | None) -> None:
    """Drop the model's weights and hand the GPU memory back to the host."""
    import torch

    if coca is not None:
        coca.model = None  # the last reference: the tagger's text encoder is dropped by its owner
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
