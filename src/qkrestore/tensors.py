"""Torch views of checkpoint bytes, for the few places that compute on values (drift, QK-Pro)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .checkpoint import Checkpoint
from .dtypes import to_tensor

if TYPE_CHECKING:
    import torch


def read_rows(
    ckpt: Checkpoint, name: str, rows: Sequence[Sequence[int]], dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The given row ranges of a tensor, concatenated in order (optionally converted)."""
    import torch

    info = ckpt.info(name)
    parts = []
    for r0, r1 in rows:
        part = to_tensor(ckpt.read(name, (r0, r1)), info.dtype, (r1 - r0, *info.shape[1:]))
        parts.append(part if dtype is None else part.to(dtype))
    return torch.cat(parts)
