"""Restore methods: what a method supplies to the job pipeline, and QK-Restore itself.

A method answers two questions, and nothing in the pipeline branches on which method it is:

* ``plan(pre, post)``: which rows of which tensors OUT takes from elsewhere (a :class:`RestorePlan`);
* ``compute(plan, pre, post, scratch)``: the bytes of the rows it computes rather than copies
  (``None`` when every planned row is copied from PRE).

QK-Pro (:class:`qkrestore.qkpro.method.QKPro`) is the other method; the evaluation loop and the Python API
build methods the same way the CLI does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..io.checkpoint import Checkpoint
from .plan import METHOD_RESTORE, PlanOptions, RestorePlan, build_plan


class Computed(Protocol):
    """Computed rows by tensor name (already in POST's dtype), with figures about the computation.

    A read-only mapping (the writer looks rows up by name) that holds resources until closed.
    """

    stats: dict[str, Any]

    def __getitem__(self, name: str) -> bytes: ...

    def __contains__(self, name: object) -> bool: ...

    def close(self) -> None: ...


class Method(Protocol):
    """A restore method, as the job pipeline sees it.

    Read-only members (properties), so that frozen dataclasses satisfy the protocol. ``title`` and
    ``explanation`` are what the model card says of the method: the card never looks text up by
    the method's name.
    """

    @property
    def name(self) -> str: ...

    @property
    def options(self) -> PlanOptions: ...

    @property
    def title(self) -> str: ...

    @property
    def explanation(self) -> str: ...

    def plan(self, pre: Checkpoint, post: Checkpoint) -> RestorePlan: ...

    def compute(
        self, plan: RestorePlan, pre: Checkpoint, post: Checkpoint, scratch: Path
    ) -> Computed | None: ...


@dataclass(frozen=True)
class QKRestore:
    """QK-Restore (and its ablations via ``targets``): the planned rows are PRE's bytes."""

    options: PlanOptions = field(default_factory=PlanOptions)
    name: str = METHOD_RESTORE
    title: str = "QK-Restore"
    explanation: str = (
        "In the softmax-attention layers listed below, the query/key routing parameters (W_Q, W_K, "
        "their biases and norms) were taken from the pre-SFT checkpoint; every other parameter is "
        "the fine-tuned checkpoint's, byte for byte. This brings back long-range recall that "
        "chain-of-thought fine-tuning erodes, without training."
    )

    def plan(self, pre: Checkpoint, post: Checkpoint) -> RestorePlan:
        return build_plan(pre, post, self.options)

    def compute(
        self, plan: RestorePlan, pre: Checkpoint, post: Checkpoint, scratch: Path
    ) -> Computed | None:
        return None


__all__ = ["Computed", "Method", "QKRestore"]
