"""Hybrid and mixed-attention families with transformers classes: one block of data each.

Every layer map below follows the family's configuration and modeling code in transformers 5.24.0
(``models/<m>/configuration_*.py`` and ``modeling_*.py``; see ``docs/families-hybrid.md``). Saved
``config.json`` files may carry either the v5 layer-type words or the legacy ones (``attention``,
``mamba``), so both are read. Layers are picked from the config only, never from tensor names.

gpt-oss attention sinks: ``self_attn.sinks`` holds one learned logit per query head that joins the
softmax denominator (``modeling_gpt_oss.py::eager_attention_forward``). It changes the attention
probabilities, so it is routing; it is indexed by query head, so it belongs to target ``q``: it is
restored with ``--targets q`` (the default ``q,k``) and kept POST's otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import ConfigError, PlanError
from .base import (
    GENERIC_WORDS,
    Config,
    Family,
    Kind,
    LayerContext,
    RoutingTensor,
    TensorSpec,
    generic_kinds,
    int_field,
    kinds_from_words,
    spec_tensors,
)
from .common import separate_projections

# -- helpers --------------------------------------------------------------------------------------

# transformers' ``_LEGACY_LAYER_TYPE_REMAP`` plus the generic words: "mamba" is a linear mixer.
LEGACY_WORDS: dict[str, Kind] = {**GENERIC_WORDS, "mamba": Kind.OTHER}


def _need(n: int | None) -> int:
    if n is None:
        raise ConfigError("config.json: 'num_hidden_layers' is missing")
    return n


def _int_list(cfg: Config, key: str) -> list[int]:
    value = cfg.get(key)
    if not isinstance(value, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in value
    ):
        raise ConfigError(f"config.json: '{key}' must be a list of integers")
    return value


def _first_list(cfg: Config, *keys: str) -> tuple[str, object] | None:
    for key in keys:
        if cfg.get(key) is not None:
            return key, cfg[key]
    return None


# -- layer maps -----------------------------------------------------------------------------------

NEMOTRON_H_PATTERN: Mapping[str, Kind] = {
    "*": Kind.GLOBAL,
    "M": Kind.OTHER,
    "-": Kind.OTHER,
    "E": Kind.OTHER,
}


def nemotron_h_kinds(cfg: Config, n: int | None) -> list[Kind]:
    """Nemotron-H: ``layers_block_type`` (v5 saves it; ``layer_types`` is its alias), else the
    remote-code ``hybrid_override_pattern`` where ``*`` is attention (M mamba, - mlp, E moe).

    ``NemotronHConfig.__post_init__`` gives the list precedence over the pattern; legacy words
    (``attention``, ``mamba``) are remapped as transformers does.
    """
    found = _first_list(cfg, "layers_block_type", "layer_types")
    if found is not None:
        key, words = found
        return kinds_from_words(words, LEGACY_WORDS, key)
    pattern = cfg.get("hybrid_override_pattern")
    if isinstance(pattern, str) and pattern:
        bad = sorted(set(pattern) - set(NEMOTRON_H_PATTERN))
        if bad:
            raise ConfigError(
                f"config.json: 'hybrid_override_pattern' has unknown characters {bad} "
                "(expected M, *, - or E)"
            )
        return [NEMOTRON_H_PATTERN[c] for c in pattern]
    raise ConfigError(
        "config.json: a Nemotron-H config needs 'layers_block_type' or 'hybrid_override_pattern'"
    )


def jamba_kinds(cfg: Config, n: int | None) -> list[Kind]:
    """Jamba: attention iff ``i % attn_layer_period == attn_layer_offset`` (defaults 8 and 4)."""
    if cfg.get("layer_types") is not None:
        return kinds_from_words(cfg.get("layer_types"), LEGACY_WORDS)
    period = int_field(cfg, "attn_layer_period", 8)
    offset = cfg.get("attn_layer_offset", 4)
    if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset < period:
        raise ConfigError(
            "config.json: 'attn_layer_offset' must be an integer in [0, attn_layer_period)"
        )
    return [Kind.GLOBAL if i % period == offset else Kind.OTHER for i in range(_need(n))]


def falcon_h1_kinds(cfg: Config, n: int | None) -> list[Kind]:
    """Falcon-H1 is a parallel hybrid: attention runs beside Mamba2 in every layer.

    ``FalconH1Config.layers_block_type`` is a read-only property that always says ``hybrid``; a
    list saved in config.json is ignored by transformers, and so it is here.
    """
    return [Kind.GLOBAL] * _need(n)


def bamba_kinds(cfg: Config, n: int | None) -> list[Kind]:
    """Bamba: attention iff ``i in attn_layer_indices`` (no list: every layer is Mamba2)."""
    indices = set(_int_list(cfg, "attn_layer_indices")) if cfg.get("attn_layer_indices") else set()
    return [Kind.GLOBAL if i in indices else Kind.OTHER for i in range(_need(n))]


def granite_hybrid_kinds(cfg: Config, n: int | None) -> list[Kind]:
    """GraniteMoeHybrid: ``layer_types`` (alias ``layers_block_type``) with either vocabulary:
    ``attention``/``full_attention`` are softmax, ``mamba``/``linear_attention`` are Mamba2.
    With neither, transformers makes every layer Mamba2."""
    found = _first_list(cfg, "layer_types", "layers_block_type")
    if found is None:
        return [Kind.OTHER] * _need(n)
    key, words = found
    return kinds_from_words(words, LEGACY_WORDS, key)


def lfm2_kinds(cfg: Config, n: int | None) -> list[Kind]:
    """LFM2 / LFM2-MoE: a layer is attention iff ``layer_types[i] != "conv"``; without
    ``layer_types``, iff ``i in full_attn_idxs``; with neither, every layer is attention."""
    words = cfg.get("layer_types")
    if words is not None:
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise ConfigError("config.json: 'layer_types' must be a list of strings")
        return [Kind.OTHER if w == "conv" else GENERIC_WORDS.get(w, Kind.GLOBAL) for w in words]
    n = _need(n)
    if cfg.get("full_attn_idxs") is not None:
        full = set(_int_list(cfg, "full_attn_idxs"))
        return [Kind.GLOBAL if i in full else Kind.OTHER for i in range(n)]
    return [Kind.GLOBAL] * n


def minimax_kinds(cfg: Config, n: int | None) -> list[Kind]:
    """MiniMax: ``layer_types`` (``linear_attention`` = lightning), else the remote-code
    ``attn_type_list`` (1 = softmax, 0 = lightning), else transformers' default (even ``i``).

    transformers gives every softmax layer a sliding-window mask when ``sliding_window`` is set
    (``MiniMaxModel.forward``), so those layers are local then.
    """
    soft = Kind.LOCAL if cfg.get("sliding_window") else Kind.GLOBAL
    words = cfg.get("layer_types")
    if words is not None:
        vocab = {"full_attention": soft, "attention": soft}
        vocab |= {"linear_attention": Kind.OTHER, "mamba": Kind.OTHER}
        kinds = kinds_from_words(words, vocab)
        for i, w in enumerate(words):
            if w not in vocab:
                raise ConfigError(f"config.json: layer_types[{i}] = {w!r} is not a MiniMax layer")
        return kinds
    types = cfg.get("attn_type_list")
    if types is not None:
        if not isinstance(types, list) or any(
            t not in (0, 1) or isinstance(t, bool) for t in types
        ):
            raise ConfigError("config.json: 'attn_type_list' must be a list of 0 and 1")
        return [soft if t == 1 else Kind.OTHER for t in types]
    return [soft if i % 2 == 0 else Kind.OTHER for i in range(_need(n))]


def olmo_hybrid_kinds(cfg: Config, n: int | None) -> list[Kind]:
    """OLMo-Hybrid: ``layer_types``, else full iff ``i % 4 == 3`` (and the last layer when that
    gives none, as ``OlmoHybridConfig.__post_init__`` does)."""
    if cfg.get("layer_types") is not None:
        return generic_kinds(cfg, n)
    n = _need(n)
    kinds = [Kind.GLOBAL if i % 4 == 3 else Kind.OTHER for i in range(n)]
    if Kind.GLOBAL not in kinds:
        kinds[-1] = Kind.GLOBAL
    return kinds


def gemma3_kinds(cfg: Config, n: int | None) -> list[Kind]:
    """Gemma3: ``layer_types``, else full iff ``(i + 1) % sliding_window_pattern == 0`` (default
    6), all others sliding; a model with fewer layers than the pattern has no global layer."""
    if cfg.get("layer_types") is not None:
        return generic_kinds(cfg, n)
    pattern = int_field(cfg, "sliding_window_pattern", 6)
    return [Kind.GLOBAL if (i + 1) % pattern == 0 else Kind.LOCAL for i in range(_need(n))]


def gpt_oss_kinds(cfg: Config, n: int | None) -> list[Kind]:
    """gpt-oss: ``layer_types``, else sliding for even ``i`` and full for odd ``i``."""
    if cfg.get("layer_types") is not None:
        return generic_kinds(cfg, n)
    return [Kind.GLOBAL if i % 2 else Kind.LOCAL for i in range(_need(n))]


def recurrent_gemma_kinds(cfg: Config, n: int | None) -> list[Kind]:
    """RecurrentGemma: ``block_types`` repeated over the layers (default recurrent, recurrent,
    attention). Attention blocks always use a sliding window, so no layer is global."""
    blocks = cfg.get("block_types", ["recurrent", "recurrent", "attention"])
    if not isinstance(blocks, list) or not blocks or not all(isinstance(b, str) for b in blocks):
        raise ConfigError("config.json: 'block_types' must be a non-empty list of strings")
    return [
        Kind.OTHER if blocks[i % len(blocks)] == "recurrent" else Kind.LOCAL
        for i in range(_need(n))
    ]


# -- tensor layouts -------------------------------------------------------------------------------


def minimax_tensors(family: Family, ctx: LayerContext) -> list[RoutingTensor]:
    """The spec tensors, after checking that the layer is not a lightning-attention block."""
    fused = ctx.name(family.module, "qkv_proj.weight")
    if fused in ctx.tensors:
        raise PlanError(
            f"layer {ctx.layer} is softmax attention by config.json but holds '{fused}', a "
            "lightning-attention projection; the config and the weights disagree"
        )
    return spec_tensors(family, ctx)


GPT_OSS_TENSORS = (
    *separate_projections(),
    # sinks[h] is one extra logit per query head in the softmax denominator: routing, owned by q.
    TensorSpec("sinks", "q", "sink", required=True),
)

LFM2_TENSORS = separate_projections(o="out_proj", q_norm="q_layernorm", k_norm="k_layernorm")

# -- the families ---------------------------------------------------------------------------------

FAMILIES: tuple[Family, ...] = (
    Family(
        name="nemotron_h",
        model_types=("nemotron_h",),
        architectures=("NemotronHForCausalLM",),
        kinds=nemotron_h_kinds,
        tensors=separate_projections(),
        module="mixer",
        description="Nemotron-H: '*' / full_attention mixers under backbone.layers.<i>.mixer",
    ),
    Family(
        name="jamba",
        model_types=("jamba",),
        architectures=("JambaForCausalLM",),
        kinds=jamba_kinds,
        tensors=separate_projections(),
        description="Jamba: attention iff i % attn_layer_period == attn_layer_offset",
    ),
    Family(
        name="falcon_h1",
        model_types=("falcon_h1",),
        architectures=("FalconH1ForCausalLM",),
        kinds=falcon_h1_kinds,
        tensors=separate_projections(),
        description="Falcon-H1: parallel hybrid, attention in every layer",
    ),
    Family(
        name="bamba",
        model_types=("bamba",),
        architectures=("BambaForCausalLM",),
        kinds=bamba_kinds,
        tensors=separate_projections(),
        description="Bamba: attention at attn_layer_indices",
    ),
    Family(
        name="granitemoehybrid",
        model_types=("granitemoehybrid",),
        architectures=("GraniteMoeHybridForCausalLM",),
        kinds=granite_hybrid_kinds,
        tensors=separate_projections(),
        description="GraniteMoeHybrid: layer_types attention/full_attention",
    ),
    Family(
        name="lfm2",
        model_types=("lfm2", "lfm2_moe"),
        architectures=("Lfm2ForCausalLM", "Lfm2MoeForCausalLM"),
        kinds=lfm2_kinds,
        tensors=LFM2_TENSORS,
        description="LFM2 / LFM2-MoE: attention where layer_types != conv; q/k_layernorm",
    ),
    Family(
        name="minimax",
        model_types=("minimax", "minimax_text_01"),
        architectures=("MiniMaxForCausalLM", "MiniMaxText01ForCausalLM", "MiniMaxM1ForCausalLM"),
        kinds=minimax_kinds,
        tensors=separate_projections(),
        resolve=minimax_tensors,
        description="MiniMax: layer_types or attn_type_list 1 = softmax; lightning layers skipped",
    ),
    Family(
        name="olmo_hybrid",
        model_types=("olmo_hybrid",),
        architectures=("OlmoHybridForCausalLM",),
        kinds=olmo_hybrid_kinds,
        tensors=separate_projections(),
        description="OLMo-Hybrid: full_attention layers; whole-projection q/k norms",
    ),
    Family(
        name="gemma3",
        model_types=("gemma3", "gemma3_text"),
        architectures=("Gemma3ForConditionalGeneration", "Gemma3ForCausalLM"),
        kinds=gemma3_kinds,
        tensors=separate_projections(),
        description="Gemma3: full vs sliding from layer_types or sliding_window_pattern",
    ),
    Family(
        name="gpt_oss",
        model_types=("gpt_oss",),
        architectures=("GptOssForCausalLM",),
        kinds=gpt_oss_kinds,
        tensors=GPT_OSS_TENSORS,
        description="gpt-oss: full vs sliding layers; attention sinks restored with q",
        notes=("self_attn.sinks (one logit per query head) is routing and belongs to target q",),
    ),
    Family(
        name="recurrent_gemma",
        model_types=("recurrent_gemma",),
        architectures=("RecurrentGemmaForCausalLM",),
        kinds=recurrent_gemma_kinds,
        tensors=separate_projections(),
        module="temporal_block",
        description="RecurrentGemma: local attention blocks only (needs --include-sliding)",
    ),
)
