"""The model families qkrestore knows, one small block of data each.

Facts come from transformers' configuration/modeling code and, for remote-code families, their public
configs (see ``docs/families.md``). Each family is registered by its
``model_type`` and ``architectures``; anything else with a ``layer_types`` list gets the generic adapter.
"""

from __future__ import annotations

import ast

from ..errors import ConfigError, PlanError
from ..io.checkpoint import TensorInfo
from .base import (
    Config,
    Family,
    Kind,
    RowRanges,
    TensorSpec,
    generic_kinds,
    head_dim,
    int_field,
    kinds_from_words,
)

# -- tensor sets ----------------------------------------------------------------------------------


def separate_projections(
    q: str = "q_proj",
    k: str = "k_proj",
    v: str = "v_proj",
    o: str = "o_proj",
    q_norm: str = "q_norm",
    k_norm: str = "k_norm",
    q_rows=None,
) -> tuple[TensorSpec, ...]:
    """The common layout: one Linear per projection, optional biases and per-head q/k norms."""
    return (
        TensorSpec(f"{q}.weight", "q", "weight", rows=q_rows, required=True),
        TensorSpec(f"{q}.bias", "q", "bias", rows=q_rows),
        TensorSpec(f"{q_norm}.weight", "q", "norm"),
        TensorSpec(f"{k}.weight", "k", "weight", required=True),
        TensorSpec(f"{k}.bias", "k", "bias"),
        TensorSpec(f"{k_norm}.weight", "k", "norm"),
        TensorSpec(f"{v}.weight", "v", "weight", required=True),
        TensorSpec(f"{v}.bias", "v", "bias"),
        TensorSpec(f"{o}.weight", "o", "weight", required=True),
        TensorSpec(f"{o}.bias", "o", "bias"),
    )


def gated_query_rows(cfg: Config, info: TensorInfo) -> RowRanges:
    """Qwen3-Next / Qwen3.5 ``q_proj``: per head, ``head_dim`` query rows then ``head_dim`` gate rows.

    The gate multiplies the attention output and never enters the logits, so it stays POST's.
    """
    heads, hd = int_field(cfg, "num_attention_heads"), head_dim(cfg)
    if info.rows != 2 * heads * hd:
        raise PlanError(
            f"'{info.name}' has {info.rows} rows; a gated q_proj with {heads} heads of {hd} "
            f"needs {2 * heads * hd}"
        )
    return tuple((h * 2 * hd, h * 2 * hd + hd) for h in range(heads))


# -- layer maps -----------------------------------------------------------------------------------


def _has_layer_types(cfg: Config) -> bool:
    return cfg.get("layer_types") is not None


def _need(n: int | None) -> int:
    if n is None:
        raise ConfigError("config.json: 'num_hidden_layers' is missing")
    return n


def all_global_kinds(cfg: Config, n: int | None) -> list[Kind]:
    """Dense transformers: every layer is global unless ``layer_types`` says otherwise."""
    if _has_layer_types(cfg):
        return generic_kinds(cfg, n)
    return [Kind.GLOBAL] * _need(n)


def mistral_kinds(cfg: Config, n: int | None) -> list[Kind]:
    """Mistral applies ``sliding_window`` to every layer when it is set."""
    if _has_layer_types(cfg):
        return generic_kinds(cfg, n)
    kind = Kind.LOCAL if cfg.get("sliding_window") else Kind.GLOBAL
    return [kind] * _need(n)


def qwen2_kinds(cfg: Config, n: int | None) -> list[Kind]:
    """Qwen2/Qwen3: sliding from ``max_window_layers`` on, and only with ``use_sliding_window``."""
    if _has_layer_types(cfg):
        return generic_kinds(cfg, n)
    n = _need(n)
    if not cfg.get("use_sliding_window"):
        return [Kind.GLOBAL] * n
    first = cfg.get("max_window_layers", n)
    return [Kind.LOCAL if i >= first else Kind.GLOBAL for i in range(n)]


def interval_kinds(cfg: Config, n: int | None) -> list[Kind]:
    """Qwen3-Next / Qwen3.5: ``layer_types``, else every ``full_attention_interval``-th layer."""
    if _has_layer_types(cfg):
        return generic_kinds(cfg, n)
    k = int_field(cfg, "full_attention_interval", 4)
    return [Kind.GLOBAL if (i + 1) % k == 0 else Kind.OTHER for i in range(_need(n))]


def hypenet_kinds(cfg: Config, n: int | None) -> list[Kind]:
    """HypeNet's ``mixer_types``: ``attn`` is softmax; lightning/GDN/KDA/Mamba2 are linear."""
    return kinds_from_words(cfg.get("mixer_types"), {"attn": Kind.GLOBAL}, "mixer_types")


def jet_nemotron_kinds(cfg: Config, n: int | None) -> list[Kind]:
    """Jet-Nemotron's ``layer_types``: ``attn`` full, ``swa`` sliding, ``jet`` a JetBlock.

    Some released configs hold the list as a string of Python syntax; it is parsed as a literal,
    never evaluated.
    """
    words = cfg.get("layer_types")
    if isinstance(words, str):
        try:
            words = ast.literal_eval(words)
        except (ValueError, SyntaxError):
            raise ConfigError("config.json: 'layer_types' is a string but not a list") from None
    return kinds_from_words(words, {"attn": Kind.GLOBAL, "swa": Kind.LOCAL})


# -- the families ---------------------------------------------------------------------------------

GENERIC = Family(
    name="generic",
    model_types=(),
    kinds=generic_kinds,
    tensors=separate_projections(),
    description="any config with transformers' layer_types list",
)

FAMILIES: tuple[Family, ...] = (
    Family(
        name="qwen3_next",
        model_types=("qwen3_next", "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text"),
        architectures=(
            "Qwen3NextForCausalLM",
            "Qwen3_5ForCausalLM",
            "Qwen3_5ForConditionalGeneration",
            "Qwen3_5MoeForCausalLM",
            "Qwen3_5MoeForConditionalGeneration",
        ),
        kinds=interval_kinds,
        tensors=separate_projections(q_rows=gated_query_rows),
        description="Qwen3-Next / Qwen3.5: gated q_proj, query rows only",
    ),
    Family(
        name="hypenet",
        model_types=("hypenet", "hybrid"),
        architectures=("HypeNetForCausalLM", "HybridForCausalLM"),
        kinds=hypenet_kinds,
        tensors=separate_projections(),
        description="HypeNet (remote code): mixer_types 'attn' layers",
    ),
    Family(
        name="jet_nemotron",
        model_types=("jet_nemotron",),
        architectures=("JetNemotronForCausalLM",),
        kinds=jet_nemotron_kinds,
        tensors=separate_projections(),
        description="Jet-Nemotron (remote code): layer_types 'attn' full, 'swa' sliding",
    ),
    Family(
        name="llama",
        model_types=("llama",),
        architectures=("LlamaForCausalLM",),
        kinds=all_global_kinds,
        tensors=separate_projections(),
        description="Llama: every layer global",
    ),
    Family(
        name="mistral",
        model_types=("mistral",),
        architectures=("MistralForCausalLM",),
        kinds=mistral_kinds,
        tensors=separate_projections(),
        description="Mistral: every layer sliding when sliding_window is set",
    ),
    Family(
        name="qwen2",
        model_types=("qwen2", "qwen3"),
        architectures=("Qwen2ForCausalLM", "Qwen3ForCausalLM"),
        kinds=qwen2_kinds,
        tensors=separate_projections(),
        description="Qwen2 / Qwen3: sliding from max_window_layers when use_sliding_window",
    ),
)
