"""Family registry: find the family of a checkpoint from its config alone, and its layer map."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import ConfigError
from ..io.checkpoint import TensorInfo
from . import derived, fused, hybrid, shared
from .base import (
    ROUTING_TARGETS,
    TARGETS,
    Config,
    Family,
    Kind,
    LayerContext,
    RoutingTensor,
    TensorSpec,
    is_auxiliary,
    spec_tensors,
    text_config,
    whole,
)
from .common import FAMILIES as CORE_FAMILIES
from .common import GENERIC
from .layermap import LayerMap

FAMILIES: tuple[Family, ...] = CORE_FAMILIES + hybrid.FAMILIES + fused.FAMILIES + shared.FAMILIES

__all__ = [
    "FAMILIES",
    "GENERIC",
    "ROUTING_TARGETS",
    "TARGETS",
    "Family",
    "Kind",
    "LayerContext",
    "LayerMap",
    "Resolved",
    "RoutingTensor",
    "TensorSpec",
    "is_auxiliary",
    "layer_map",
    "resolve",
    "spec_tensors",
    "text_config",
    "whole",
]

BY_MODEL_TYPE: dict[str, Family] = {mt: a for a in FAMILIES for mt in a.model_types}
assert len(BY_MODEL_TYPE) == sum(len(a.model_types) for a in FAMILIES), (
    "model_type registered twice"
)
BY_ARCHITECTURE: dict[str, Family] = {arch: a for a in FAMILIES for arch in a.architectures}


@dataclass(frozen=True)
class Resolved:
    """An adapter chosen for a config, and why (shown to the user)."""

    family: Family
    model_type: str
    reason: str


def resolve(config: Config) -> Resolved:
    """Pick the adapter by ``model_type``, then ``architectures``, then a ``layer_types`` list,
    then a layer map derived from transformers' own classes (:mod:`.derived`); else refuse."""
    model_type = str(config.get("model_type", ""))
    inner = text_config(config)
    inner_type = str(inner.get("model_type", "")) if inner is not config else ""
    for mt in (model_type, inner_type):
        if mt in BY_MODEL_TYPE:
            return Resolved(BY_MODEL_TYPE[mt], model_type or mt, f"model_type '{mt}'")
    archs = config.get("architectures") or []
    for arch in archs if isinstance(archs, list) else []:
        if arch in BY_ARCHITECTURE:
            return Resolved(BY_ARCHITECTURE[arch], model_type, f"architecture '{arch}'")
    if inner.get("layer_types") is not None:
        return Resolved(
            GENERIC,
            model_type,
            f"unknown model_type '{model_type}': using the generic adapter on its layer_types",
        )
    try:
        found = derived.derive(config)
    except derived.DeriveError as exc:
        why = f" ({exc.message.removeprefix('config.json: ')})"
    else:
        return Resolved(
            found.family,
            model_type or found.model_type,
            f"no adapter for model_type '{found.model_type}': layer map {found.family.description}",
        )
    known = ", ".join(sorted(BY_MODEL_TYPE))
    raise ConfigError(
        f"config.json: model_type '{model_type or '?'}' is not a known family and has no "
        f"layer_types, and its layer map could not be derived from transformers{why}",
        hint=f"known families: {known}; for another family name the tensors by hand, e.g. "
        "--layers 3,7 --tensor-pattern 'model\\.layers\\.{i}\\.attn\\.(q|k)_proj\\.weight'",
    )


def layer_map(config: Config, tensors: Mapping[str, TensorInfo] | None = None) -> LayerMap:
    """The layer map of a model from its config and, optionally, its tensor names.

    Raises ``ConfigError`` when the family or its layer list cannot be read, and ``PlanError`` when
    ``tensors`` hold no layer the family's adapter recognises.
    """
    resolved = resolve(config)
    family = resolved.family
    read = family.read_layer_kinds(config)
    prefix = family.layer_prefix(list(tensors)) if tensors is not None else ""
    return LayerMap(
        family=family,
        model_type=resolved.model_type,
        reason=resolved.reason,
        config=config,
        kinds=tuple(read.kinds),
        reasons=tuple(read.reasons),
        tensors=tensors or {},
        prefix=prefix,
    )
