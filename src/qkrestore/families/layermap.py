"""A model's layer map: "which layers, which kinds, which routing tensors", as one object.

Planning, ``inspect-layers``, ``drift`` and ``attn-distance`` all read a model's layer map through
:func:`qkrestore.families.layer_map`, which builds a :class:`LayerMap`, so a family's quirks (VLM nesting, fused rows, shared blocks, MLA) are handled in
one place and every command sees the same layers and rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..io.checkpoint import TensorInfo
from .base import ROUTING_TARGETS, Config, Family, Kind, RoutingTensor


@dataclass(frozen=True)
class LayerMap:
    """A model's family, its decoder layers' kinds and, given tensor names, their routing tensors.

    Built from the config alone (``tensors`` empty: kinds only), or from a checkpoint's config and
    header (``tensors`` and ``prefix`` set: routing tensors can be looked up).
    """

    family: Family
    model_type: str
    reason: str
    config: Config
    kinds: tuple[Kind, ...]
    reasons: tuple[str, ...] = ()  # per layer: why it is global, local or not attention
    tensors: Mapping[str, TensorInfo] = field(default_factory=dict)
    prefix: str = ""

    @property
    def global_layers(self) -> list[int]:
        return [i for i, k in enumerate(self.kinds) if k is Kind.GLOBAL]

    @property
    def local_layers(self) -> list[int]:
        return [i for i, k in enumerate(self.kinds) if k is Kind.LOCAL]

    @property
    def softmax_layers(self) -> list[int]:
        return [i for i, k in enumerate(self.kinds) if k is not Kind.OTHER]

    def by_target(
        self,
        layer: int,
        targets: Sequence[str] = ROUTING_TARGETS,
        options: Mapping[str, Any] | None = None,
    ) -> dict[str, list[RoutingTensor]]:
        """Each target's tensors in ``layer``, looked up one target at a time.

        The adapters merge the rows of a fused tensor across the targets they are asked for, so a
        caller that needs Q's rows apart from K's (drift) asks per target.
        """
        return {
            t: self.family.layer_tensors(
                self.config, layer, self.tensors, (t,), self.prefix, options
            )
            for t in targets
        }

    def routing(
        self,
        layer: int,
        targets: Sequence[str] = ROUTING_TARGETS,
        options: Mapping[str, Any] | None = None,
    ) -> list[RoutingTensor]:
        """The tensors of ``layer`` for ``targets``, one entry per tensor with the rows they own."""
        return self.family.layer_tensors(
            self.config, layer, self.tensors, targets, self.prefix, options
        )


__all__ = ["LayerMap"]
