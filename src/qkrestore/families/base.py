"""What a family is: its layer map and routing tensors, as data.

A family reads only ``config.json`` (never remote model code) and answers two questions:

* which decoder layers are global softmax attention, which are local (sliding/chunked), and which are
  something else (linear attention, SSM, MLP);
* for a softmax layer, which tensors hold W_Q, W_K (and their biases and norms), W_V and W_O, and where
  a tensor is fused or gated, which of its rows belong to Q or K.

Tensor names are never used to decide what a layer *is*: several families (HypeNet, Kimi Linear,
MiniMax) call their linear-attention projections ``q_proj``/``k_proj`` too.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, PlanError
from ..io.checkpoint import TensorInfo
from .window import Config, Kind, LayerKinds, apply_window_rule

RowRanges = tuple[tuple[int, int], ...]


TARGETS = ("q", "k", "v", "o")
ROUTING_TARGETS = ("q", "k")

# Layer-type spellings shared by transformers' configs (v4 legacy and v5 names).
GENERIC_WORDS: dict[str, Kind] = {
    "full_attention": Kind.GLOBAL,
    "attention": Kind.GLOBAL,
    "sliding_attention": Kind.LOCAL,
    "chunked_attention": Kind.LOCAL,
}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a layer's attention block, named relative to the layer's attention module.

    ``rows`` picks the rows of a fused or gated tensor that belong to the target; ``None`` means the
    whole tensor. ``required`` tensors must exist in a planned layer; optional ones (biases, norms)
    are taken when the checkpoint has them. ``option`` names a planning option that must be set for
    the spec to apply (e.g. Kimi's MLA latent rows with ``--mla-latent pre``). Two specs may name the
    same tensor; their rows are merged.
    """

    suffix: str
    target: str
    role: str  # "weight", "bias", "norm", "sink", "scale"
    rows: Callable[[Config, TensorInfo], RowRanges] | None = None
    required: bool = False
    option: str | None = None


@dataclass(frozen=True)
class RoutingTensor:
    """A concrete tensor of one layer with the rows that a target owns."""

    name: str
    layer: int
    target: str
    role: str
    rows: RowRanges  # always explicit, e.g. ((0, n_rows),) for a whole tensor


@dataclass(frozen=True)
class LayerContext:
    """What a family's tensor resolver sees for one planned layer."""

    config: Config  # the language model's config (``text_config`` of a VLM)
    layer: int
    tensors: Mapping[str, TensorInfo]  # every tensor of the checkpoint, by name
    targets: Sequence[str]
    prefix: str  # up to and including the layer container, e.g. ``model.layers.``
    options: Mapping[str, Any]

    def name(self, module: str, suffix: str, layer: int | None = None) -> str:
        return f"{self.prefix}{self.layer if layer is None else layer}.{module}.{suffix}"


Resolver = Callable[["Family", LayerContext], list[RoutingTensor]]


def whole(info: TensorInfo) -> RowRanges:
    return ((0, info.rows),)


def spec_tensors(family: Family, ctx: LayerContext) -> list[RoutingTensor]:
    """The default resolver: each :class:`TensorSpec` under ``<prefix><layer>.<module>.``."""
    found: list[RoutingTensor] = []
    for spec in family.tensors:
        if spec.target not in ctx.targets or (spec.option and not ctx.options.get(spec.option)):
            continue
        name = ctx.name(family.module, spec.suffix)
        info = ctx.tensors.get(name)
        if info is None:
            if spec.required:
                raise PlanError(
                    f"layer {ctx.layer} should hold '{name}' ({family.name} layout) but it is "
                    "missing"
                )
            continue
        rows = spec.rows(ctx.config, info) if spec.rows else whole(info)
        found.append(RoutingTensor(name, ctx.layer, spec.target, spec.role, rows))
    return found


def merge_rows(found: Sequence[RoutingTensor]) -> list[RoutingTensor]:
    """One entry per tensor: rows of specs naming the same tensor are united, overlaps joined."""
    by_name: dict[str, RoutingTensor] = {}
    for rt in found:
        prev = by_name.get(rt.name)
        if prev is None:
            by_name[rt.name] = rt
            continue
        spans = sorted([*prev.rows, *rt.rows])
        joined: list[tuple[int, int]] = []
        for a, b in spans:
            if joined and a <= joined[-1][1]:
                joined[-1] = (joined[-1][0], max(joined[-1][1], b))
            else:
                joined.append((a, b))
        by_name[rt.name] = RoutingTensor(rt.name, rt.layer, prev.target, prev.role, tuple(joined))
    return list(by_name.values())


@dataclass(frozen=True)
class Family:
    """A model family: how to read its layer map and where its attention tensors live.

    ``container`` and ``module`` locate a layer's attention block (``<prefix><container>.<i>.<module>.``);
    ``resolve`` replaces the spec-driven lookup for layouts that need code (shared blocks, say).
    What a family does not support is stated here as data (``no_head_pairs``), so no caller
    branches on a family's name.
    """

    name: str
    model_types: tuple[str, ...]
    kinds: Callable[[Config, int | None], list[Kind]]
    tensors: tuple[TensorSpec, ...]
    architectures: tuple[str, ...] = ()
    container: str = "layers"
    module: str = "self_attn"
    resolve: Resolver | None = None
    description: str = ""
    notes: tuple[str, ...] = field(default=())
    no_head_pairs: str = ""
    """Why a softmax layer of this family has no single W_Q/W_K pair per head (MLA's low-rank keys,
    shared blocks with per-layer adapters); empty when it has one. QK-Pro's closed form and the
    per-head drift figures need that pair, so they read this instead of checking family names."""
    # Optional per-layer words saying where the family's map came from (derived adapters use it).
    explain: Callable[[Config, int | None], list[str]] | None = None

    def layer_kinds(self, config: Config) -> list[Kind]:
        """The layer kinds, after the window rule (a window as long as the context is global)."""
        return self.read_layer_kinds(config).kinds

    def read_layer_kinds(self, config: Config) -> LayerKinds:
        """The layer kinds and, per layer, why it is global, local or not attention."""
        cfg = text_config(config)
        n = cfg.get("num_hidden_layers")
        if n is not None:
            n = num_layers(cfg)
        kinds = self.kinds(cfg, n)
        if n is not None and len(kinds) != n:
            raise ConfigError(
                f"config.json: the layer list has {len(kinds)} entries but num_hidden_layers is {n}"
            )
        base = self.explain(cfg, n) if self.explain else None
        return apply_window_rule(self.name, cfg, kinds, base)

    def layer_tensors(
        self,
        config: Config,
        layer: int,
        tensors: Mapping[str, TensorInfo],
        targets: Sequence[str],
        prefix: str,
        options: Mapping[str, Any] | None = None,
    ) -> list[RoutingTensor]:
        """The tensors of ``layer`` for ``targets``, with the rows each target owns."""
        ctx = LayerContext(text_config(config), layer, tensors, targets, prefix, options or {})
        found = (self.resolve or spec_tensors)(self, ctx)
        return merge_rows(found)

    def layer_prefix(self, names: Sequence[str]) -> str:
        """The name prefix up to the layer index, e.g. ``model.layers.`` or ``backbone.layers.``.

        Found from the checkpoint itself, so text-only and VLM saves of one family both work; MTP
        heads and vision towers are left out (they are carried over untouched).
        """
        pattern = re.compile(
            rf"^(?P<p>(?:.*\.)?{re.escape(self.container)}\.)(\d+)\.{re.escape(self.module)}\."
        )
        counts: Counter[str] = Counter()
        for name in names:
            if is_auxiliary(name):
                continue
            m = pattern.match(name)
            if m:
                counts[m.group("p")] += 1
        if not counts:
            raise PlanError(
                f"no tensors named '*{self.container}.<i>.{self.module}.*' in the checkpoint; is it "
                f"really a "
                f"{self.name} model?"
            )
        return counts.most_common(1)[0][0]


_AUX = re.compile(r"(^|\.)(mtp|visual|vision_tower|vision_model|vision_encoder|audio_tower)\.")


def is_auxiliary(name: str) -> bool:
    """MTP heads and vision/audio towers have their own attention blocks that are not decoder layers."""
    return bool(_AUX.search(name))


# -- config helpers -------------------------------------------------------------------------------


def text_config(config: Config) -> Config:
    """The language model's config: ``text_config`` inside a VLM config, else the config itself."""
    sub = config.get("text_config")
    return sub if isinstance(sub, Mapping) else config


# No released model has more than a few hundred layers; a config claiming more is damaged or
# hostile, and every per-layer loop (and transformers building the model to read its map) would
# run that many times before anything else is checked.
MAX_LAYERS = 10_000


def check_layer_count(n: int, key: str = "num_hidden_layers") -> None:
    if n > MAX_LAYERS:
        raise ConfigError(
            f"config.json: '{key}' is {n}; more than {MAX_LAYERS} layers is not a model this "
            "tool can plan (the config is damaged?)"
        )


def num_layers(cfg: Config) -> int:
    n = cfg.get("num_hidden_layers")
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ConfigError("config.json: 'num_hidden_layers' is missing or not a positive integer")
    check_layer_count(n)
    return n


def kinds_from_words(
    words: Any, words_map: Mapping[str, Kind], field_name: str = "layer_types"
) -> list[Kind]:
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise ConfigError(f"config.json: '{field_name}' must be a list of strings")
    return [words_map.get(w, Kind.OTHER) for w in words]


def generic_kinds(cfg: Config, n: int | None) -> list[Kind]:
    """``layer_types`` with transformers' vocabulary."""
    return kinds_from_words(cfg.get("layer_types"), GENERIC_WORDS)


def int_field(cfg: Config, key: str, default: int | None = None) -> int:
    value = cfg.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"config.json: '{key}' is missing or not a positive integer")
    return value


def head_dim(cfg: Config) -> int:
    hd = cfg.get("head_dim")
    if isinstance(hd, int) and hd > 0:
        return hd
    return int_field(cfg, "hidden_size") // int_field(cfg, "num_attention_heads")
