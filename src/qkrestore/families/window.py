"""Layer kinds, and the window rule: a local layer whose window covers the whole context is global.

A sliding window of ``W`` lets the query at position ``t`` see keys ``t - W + 1 … t``
(transformers' ``sliding_window_overlay``: ``q_idx - kv_idx < W``). For any sequence no longer than
``W`` that is every earlier key, so the mask equals the full causal mask. A model whose declared
maximum context ``C`` (``max_position_embeddings``) satisfies ``W ≥ C`` therefore never slides its
window inside the context it was built for: its "sliding" layers route like global ones and are
restored by default. Phi-3-mini-128k (``sliding_window`` 262144, context 131072) is the known case;
Mistral-style configs with a window of 4096 and a 4096-token context are another. A chunked layer
(``chunked_attention``, ``attention_chunk_size``) is the same: one chunk covering the context is no
chunking at all.

The rule is applied to every family's layer map (``Family.layer_kinds``), after the family has read
its config, and each layer gets a one-line reason that ``inspect-layers`` shows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

Config = Mapping[str, Any]


class Kind(str, Enum):
    """What a decoder layer's token mixer is, as far as routing is concerned."""

    GLOBAL = "global"
    LOCAL = "local"
    OTHER = "other"


CONTEXT_FIELD = "max_position_embeddings"
CHUNK_FIELD = "attention_chunk_size"

# Where a family keeps its window size when it is not ``sliding_window`` (a dotted path into the
# language model's config). Sources: RecurrentGemma's ``RecurrentGemmaConfig.attention_window_size``
# (transformers 5.24); Jet-Nemotron's ``efficient_attention_config.swa.window_size`` (NVlabs
# Jet-Nemotron configs).
WINDOW_FIELDS: Mapping[str, str] = {
    "recurrent_gemma": "attention_window_size",
    "jet_nemotron": "efficient_attention_config.swa.window_size",
}
DEFAULT_WINDOW_FIELD = "sliding_window"


@dataclass(frozen=True)
class LayerKinds:
    """A family's layer kinds after the window rule, with one human-readable reason per layer."""

    kinds: list[Kind]
    reasons: list[str]


def _lookup(cfg: Config, path: str) -> Any:
    value: Any = cfg
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _positive_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def context_length(cfg: Config) -> int | None:
    """The longest sequence the config declares (``max_position_embeddings``), if it says."""
    return _positive_int(cfg.get(CONTEXT_FIELD))


def layer_window(cfg: Config, adapter_name: str, layer: int) -> tuple[str, int | None]:
    """The field that sizes ``layer``'s local window, and its value (``None`` if absent)."""
    words = cfg.get("layer_types")
    if (
        isinstance(words, list)
        and layer < len(words)
        and words[layer] == "chunked_attention"
        and cfg.get(CHUNK_FIELD) is not None
    ):
        return CHUNK_FIELD, _positive_int(cfg.get(CHUNK_FIELD))
    field_name = WINDOW_FIELDS.get(adapter_name, DEFAULT_WINDOW_FIELD)
    return field_name, _positive_int(_lookup(cfg, field_name))


def apply_window_rule(
    adapter_name: str,
    cfg: Config,
    kinds: Sequence[Kind],
    base_reasons: Sequence[str] | None = None,
) -> LayerKinds:
    """Promote local layers whose window is at least the context to global; say why per layer.

    ``cfg`` is the language model's config; ``base_reasons`` are the family's own per-layer words
    (e.g. what its layer list says), when it has them.
    """
    context = context_length(cfg)
    out: list[Kind] = []
    reasons: list[str] = []
    for i, kind in enumerate(kinds):
        base = base_reasons[i] if base_reasons else ""
        if kind is Kind.OTHER:
            why = base or "not softmax attention"
        elif kind is Kind.GLOBAL:
            why = base or "full attention"
        else:
            field_name, window = layer_window(cfg, adapter_name, i)
            short = field_name.rsplit(".", 1)[-1]
            if window is None:
                why = f"local: config.json gives no '{field_name}' size"
            elif context is None:
                why = f"{short} {window}; no '{CONTEXT_FIELD}' to compare it with: local"
            elif window >= context:
                kind = Kind.GLOBAL
                why = f"{short} {window} ≥ context {context}: the window never slides, global"
            else:
                why = f"{short} {window} < context {context}: local"
            if base:
                why = f"{base}; {why}"
        out.append(kind)
        reasons.append(why)
    return LayerKinds(out, reasons)
