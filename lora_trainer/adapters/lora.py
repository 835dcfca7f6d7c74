"""LoRA layers: peft adapters on the UNet (and optionally the text encoders); LoHa/LoKr through lycoris.py.

Users write `target_modules: [q_proj, v_proj]` as the seed documents do. In the UNet the
attention projections are called `to_q`, `to_k`, `to_v`, `to_out.0` (diffusers' names), so the
names users write are mapped here, once, to the model's own module names. peft wraps those
modules; nothing is patched process-wide.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Set, Tuple

import torch
from torch import nn

from . import dora as dora_math
from . import lycoris
from ..errors import ConfigError, ModelError

ADAPTER = "default"

# Names users write → suffixes of the UNet's real module names (diffusers layout).
UNET_TARGETS: Dict[str, Tuple[str, ...]] = {
    "q_proj": ("attn1.to_q", "attn2.to_q"),
    "k_proj": ("attn1.to_k", "attn2.to_k"),
    "v_proj": ("attn1.to_v", "attn2.to_v"),
    "out_proj": ("attn1.to_out.0", "attn2.to_out.0"),
    "o_proj": ("attn1.to_out.0", "attn2.to_out.0"),
    "to_q": ("attn1.to_q", "attn2.to_q"),
    "to_k": ("attn1.to_k", "attn2.to_k"),
    "to_v": ("attn1.to_v", "attn2.to_v"),
    "to_out": ("attn1.to_out.0", "attn2.to_out.0"),
    "to_out.0": ("attn1.to_out.0", "attn2.to_out.0"),
    "attn": ("to_q", "to_k", "to_v", "to_out.0"),
    "proj": ("proj_in", "proj_out"),
    "proj_in": ("proj_in",),
    "proj_out": ("proj_out",),
    "ff": ("ff.net.0.proj", "ff.net.2"),
    "conv": ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv"),
}
# Flux.1's transformer (diffusers layout): the same names mean the image and the text stream's layers, in the
# double blocks and the single blocks alike (whose proj_out is the attention's output fused with the MLP's).
FLUX_TARGETS: Dict[str, Tuple[str, ...]] = {
    "q_proj": ("attn.to_q", "attn.add_q_proj"),
    "k_proj": ("attn.to_k", "attn.add_k_proj"),
    "v_proj": ("attn.to_v", "attn.add_v_proj"),
    "out_proj": ("attn.to_out.0", "attn.to_add_out", "proj_out"),
    "ff": ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp"),
    "mlp": ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp"),
}
for _same, _as in (("o_proj", "out_proj"), ("to_q", "q_proj"), ("to_k", "k_proj"), ("to_v", "v_proj"),
                   ("to_out", "out_proj")):
    FLUX_TARGETS[_same] = FLUX_TARGETS[_as]
FLUX_TARGETS["attn"] = tuple(n for k in ("q_proj", "k_proj", "v_proj", "out_proj") for n in FLUX_TARGETS[k])
FLUX_BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")  # what a name in the table may match
# The CLIP text encoders already use q_proj/k_proj/v_proj/out_proj; `ff`/`mlp` mean fc1 and fc2.
TEXT_TARGETS: Dict[str, Tuple[str, ...]] = {
    "q_proj": ("self_attn.q_proj",),
    "k_proj": ("self_attn.k_proj",),
    "v_proj": ("self_attn.v_proj",),
    "out_proj": ("self_attn.out_proj",),
    "o_proj": ("self_attn.out_proj",),
    "to_q": ("self_attn.q_proj",),
    "to_k": ("self_attn.k_proj",),
    "to_v": ("self_attn.v_proj",),
    "to_out": ("self_attn.out_proj",),
    "attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
    "ff": ("mlp.fc1", "mlp.fc2"),
    "mlp": ("mlp.fc1", "mlp.fc2"),
}


def resolve_targets(model: nn.Module, names: Iterable[str], table: Dict[str, Tuple[str, ...]],
                    strict: bool = True, within: Tuple[str, ...] = ()) -> List[str]:
    """Full module names of `model` matched by the user's target names.

    A name that is not in the table is taken as a module-name suffix (e.g. `attn2.to_k`), so
    diffusers users can be precise. A name that matches nothing is a ConfigError when `strict`
    (the UNet); the text encoders skip UNet-only names such as `proj` or `conv`.
    """
    modules = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    chosen: List[str] = []
    for user_name in names:
        suffixes = table.get(user_name, (user_name,))
        hits = [n for n in modules if any(n == s or n.endswith("." + s) for s in suffixes)
                and (user_name not in table or not within or n.startswith(within))]
        if not hits and (user_name in table or not strict):
            continue  # e.g. `ff` on a text-encoder list: a valid name that this model lacks
        if not hits:
            valid = ", ".join(sorted(table))
            raise ConfigError(f"target_modules: '{user_name}' matches no layer. Use one of: {valid}.")
        chosen.extend(h for h in hits if h not in chosen)
    return chosen


CONV_NAMES = ("conv1", "conv2", "conv")  # 3x3 ResNet and sampler convs (LoCon); 1x1 convs use lora_rank


def add_lora(
    model: nn.Module,
    targets: List[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    conv_rank: int = 0,
    conv_alpha: float = 0.0,
    dora: bool = False,
) -> List[nn.Parameter]:
    """Wrap `targets` of `model` with LoRA adapters (`dora`: DoRA per input column, dora.py) and return the
    trainable parameters.

    Every base weight is frozen; only the LoRA A/B matrices (and DoRA magnitudes) train, in fp32 whatever the base's
    dtype. B starts at zero and a DoRA magnitude at its weight's column norms, so the wrapped model computes exactly
    what the base model did until the first step. ResNet convs take `conv_rank`/`conv_alpha` (peft's rank_pattern,
    keyed by the conv's own short name, which every peft version matches the same way).
    """
    from peft import LoraConfig, inject_adapter_in_model

    convs = _conv_patterns(targets, conv_rank, conv_alpha, rank, alpha)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        rank_pattern={c: r for c, (r, _) in convs.items()},
        alpha_pattern={c: a for c, (_, a) in convs.items()},
        init_lora_weights=True,
    )
    model.requires_grad_(False)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    params = lora_parameters(model)
    if any(p.dtype != torch.float32 for p in params):  # peft gives the adapter the base layer's dtype (fp8, half)
        for p in params:
            p.data = p.data.float()
        for layer in lora_layers(model).values():  # initialised again in fp32, not rounded to the base's dtype
            layer.reset_lora_parameters(ADAPTER, True)
    if dora:
        for layer in lora_layers(model).values():
            dora_math.add_input_magnitude(layer, ADAPTER)
    return _trainable(model)


def dora_module(layer: nn.Module) -> Optional["dora_math.InputMagnitude"]:
    """The DoRA magnitude of a LoRA layer (its `weight` is m, one per input column), None for a plain LoRA layer."""
    return getattr(layer, "lora_input_magnitude", None)


def lora_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """Module name → peft LoRA layer, for every wrapped layer of `model`."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}


def lora_parameters(model: nn.Module) -> List[nn.Parameter]:
    """Every adapter parameter of `model`: LoRA's A/B (and DoRA magnitudes), LoHa's and LoKr's factors."""
    return [p for n, p in model.named_parameters() if "lora_" in n or ".hada_" in n or ".lokr_" in n]


def set_lora_scale(models: Iterable[nn.Module], scale: float) -> None:
    """Multiply every LoRA update by `scale` (the `<lora:name:scale>` strength) in place.

    A DoRA layer keeps alpha / rank inside its norm and becomes W + scale · (W' − W), as the hosts apply it
    (dora.py): its LoRA path is scaled as a plain one's, its base input by 1 + scale · (s − 1)."""
    for model in models:
        for layer in lora_layers(model).values():
            dora = dora_module(layer)
            if dora is not None:
                dora.strength = scale
            layer.scaling[ADAPTER] = scale * layer.lora_alpha[ADAPTER] / layer.r[ADAPTER]
        for layer in lycoris.lycoris_layers(model, ADAPTER).values():
            layer.scaling[ADAPTER] = scale * lycoris.host_scale(layer, ADAPTER)


def base_targets(model: nn.Module, family: str, names: Iterable[str]) -> List[str]:
    """The UNet's (or Flux transformer's) modules that `target_modules` names, as training wraps them."""
    flux = family == "flux"
    return resolve_targets(model, names, FLUX_TARGETS if flux else UNET_TARGETS, within=FLUX_BLOCKS if flux else ())


def trained_text_encoders(family: str, encoders: List[nn.Module]) -> List[nn.Module]:
    """The text encoders `train_text_encoder` trains: all of SD's; Flux's CLIP-L only, never T5."""
    return encoders[:1] if family == "flux" else list(encoders)


def add_lora_to_components(components, cfg) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
    """Wrap the UNet (and, if asked, the text encoders) as the config says.

    Returns (unet LoRA parameters, text-encoder LoRA parameters).
    """
    unet_targets = base_targets(components.unet, components.family, cfg.target_modules)
    if cfg.lora_type == "lokr":
        lycoris.check_factor(components.unet, unet_targets, cfg.lokr_factor)
    unet_params = add_adapter(components.unet, unet_targets, cfg, conv=True)
    te_params: List[nn.Parameter] = []
    trained = trained_text_encoders(components.family, components.text_encoders)
    for te in components.text_encoders:
        te.requires_grad_(False)
        if cfg.train_text_encoder and any(te is t for t in trained):
            targets = resolve_targets(te, cfg.target_modules, TEXT_TARGETS, strict=False)
            if not targets:
                targets = resolve_targets(te, ["attn"], TEXT_TARGETS)
            te_params += add_adapter(te, targets, cfg, conv=False)
    return unet_params, te_params


def add_adapter(model: nn.Module, targets: List[str], cfg, conv: bool) -> List[nn.Parameter]:
    """The adapter `cfg.lora_type` names on `targets` (LoRA, DoRA, or LoHa/LoKr from lycoris.py); its parameters."""
    conv_rank, conv_alpha = (cfg.conv_rank, cfg.conv_alpha) if conv else (0, 0.0)
    if cfg.lora_type not in lycoris.KINDS:
        return add_lora(model, targets, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, conv_rank, conv_alpha,
                        cfg.lora_type == "dora")
    lycoris.add_lycoris(model, cfg.lora_type, targets, cfg.lora_rank, cfg.lora_alpha, ADAPTER, cfg.lora_dropout,
                        _conv_patterns(targets, conv_rank, conv_alpha, cfg.lora_rank, cfg.lora_alpha),
                        cfg.lokr_factor, cfg.decompose_both)
    return _trainable(model)


def _conv_patterns(targets: List[str], conv_rank: int, conv_alpha: float, rank: int, alpha: float):
    """{conv short name: (rank, alpha)} for the ResNet convs among `targets` (peft's rank/alpha patterns)."""
    if not (conv_rank or conv_alpha):
        return {}
    short_names = {t.rsplit(".", 1)[-1] for t in targets}
    return {c: (conv_rank or rank, conv_alpha or alpha) for c in CONV_NAMES if c in short_names}


def _trainable(model: nn.Module) -> List[nn.Parameter]:
    params = lora_parameters(model)
    for p in params:
        p.requires_grad_(True)
    return params


def load_lora_into(components, kohya: Dict[str, torch.Tensor], dropout: float = 0.0,
                   trainable: bool = False) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
    """Wrap exactly the layers a kohya-layout state dict names and load its weights.

    Used for `init_lora` (continue from an existing LoRA), for resuming, and for sampling a
    saved file. Ranks and alphas come from the file; a file whose linear (or conv) layers mix
    several ranks is refused, since one peft config carries one rank per layer kind. A file with
    `dora_scale` tensors one per input column becomes DoRA (dora.py), its magnitudes those tensors; one per output
    row (peft's DoRA, newer LyCORIS) is refused.
    """
    from . import keymap

    unet_params: List[nn.Parameter] = []
    te_params: List[nn.Parameter] = []
    used = set()
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in kohya}
    kind = lycoris.kind_of(kohya)
    dora = _is_dora(kohya, names)
    for prefix, model in keymap.named_models(components):
        table = keymap.reverse_table(prefix, [n for n, _ in model.named_modules()])
        hits = {table[n]: n for n in names if n in table}
        if not hits:
            continue
        if kind is not None:
            lycoris.load_into(model, kind, hits, kohya, ADAPTER, dropout)
            params = lora_parameters(model)
        else:
            (rank, alpha), (conv_rank, conv_alpha) = _ranks(hits, kohya)
            params = add_lora(model, list(hits), rank, alpha, dropout, conv_rank, conv_alpha, dora)
            _copy_weights(lora_layers(model), hits, kohya)
        used.update(hits.values())
        for p in params:
            p.requires_grad_(trainable)
        (unet_params if prefix == keymap.UNET_PREFIX else te_params).extend(params)
    unused = sorted(names - used)
    if not used:
        from ..model.shipped import a_family

        made_for = keymap.family_of_keys(list(kohya))
        if made_for and made_for != components.family:
            raise ModelError(f"This is {a_family(made_for)} LoRA and the base model is {a_family(components.family)} "
                             "model: use a base of the family the LoRA was made for.")
        raise ModelError("None of this LoRA's layers exist in the base model: is it for another model family "
                         f"(e.g. SDXL vs SD1.5)? First key: {next(iter(kohya))}")
    if unused:
        raise ModelError(f"{len(unused)} LoRA layers do not exist in the base model (e.g. {unused[0]}): "
                         "the LoRA was made for another model family.")
    return unet_params, te_params


def _is_dora(kohya: Dict[str, torch.Tensor], names: Set[str]) -> bool:
    """Whether a kohya state dict is DoRA; one peft config is DoRA or not, so a mix is refused."""
    plain = sorted(n for n in names if f"{n}.dora_scale" not in kohya)
    if plain and len(plain) < len(names):
        raise ModelError(f"This LoRA mixes DoRA and plain LoRA layers (e.g. {plain[0]} has no dora_scale); "
                         "continue from a LoRA that is all one or the other.")
    return not plain


def _ranks(hits: Dict[str, str], kohya: Dict[str, torch.Tensor]) -> Tuple[Tuple[int, float], Tuple[int, float]]:
    """((rank, alpha) of the linear layers, (rank, alpha) of the convs or (0, 0.0)) of a file's modules."""
    groups: Dict[bool, set] = {True: set(), False: set()}
    for module_name, key in hits.items():
        is_conv = module_name.rsplit(".", 1)[-1] in CONV_NAMES
        rank = kohya[f"{key}.lora_down.weight"].shape[0]
        alpha = float(kohya[f"{key}.alpha"]) if f"{key}.alpha" in kohya else float(rank)
        groups[is_conv].add((rank, alpha))
    for kind, pairs in groups.items():
        if len(pairs) > 1:
            raise ModelError(f"This LoRA mixes ranks/alphas {sorted(pairs)} across its {'conv' if kind else 'linear'}"
                             " layers; continue from a LoRA with one rank per layer kind.")
    linear = next(iter(groups[False] or groups[True]))
    return linear, next(iter(groups[True])) if groups[True] else (0, 0.0)


def _copy_weights(layers: Dict[str, nn.Module], hits: Dict[str, str], kohya: Dict[str, torch.Tensor]) -> None:
    """The file's down/up (and DoRA magnitudes) into the wrapped layers `hits` names."""
    with torch.no_grad():
        for module_name, key in hits.items():
            layer = layers[module_name]
            down, up = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            down.copy_(kohya[f"{key}.lora_down.weight"].reshape_as(down))
            up.copy_(kohya[f"{key}.lora_up.weight"].reshape_as(up))
            dora = dora_module(layer)
            if dora is None:
                continue
            scale = kohya[f"{key}.dora_scale"]
            if not dora_math.on_input_axis(scale, down.shape[1]):
                raise ModelError(f"{key}: its dora_scale {tuple(scale.shape)} scales output channels (peft's DoRA, "
                                 "LyCORIS wd_on_output=True); this trainer's DoRA scales input channels, the layout "
                                 "every host applies exactly, so it cannot sample or continue from this file "
                                 "(merge --base can bake it into a checkpoint).")
            dora.weight.copy_(scale.reshape_as(dora.weight))
