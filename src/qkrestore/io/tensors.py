"""Torch views of checkpoint bytes, for the few places that compute on values (drift, QK-Pro), and
the one check that values are finite."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import PlanError
from .checkpoint import Checkpoint
from .dtypes import has_nonfinite, to_tensor

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


def nonfinite(t: torch.Tensor) -> bool:
    """Whether a float tensor holds a NaN or an Inf."""
    import torch

    return t.is_floating_point() and not bool(torch.isfinite(t).all())


def check_finite(ckpt: Checkpoint, name: str) -> None:
    """Refuse a float tensor holding NaN or Inf, naming the file and the tensor.

    Values from elsewhere (an adapter's factors) are checked as they come in, and values the tool
    makes (a merged weight, a QK-Pro solution) where they are made, so nothing non-finite is
    written without a word.
    """
    info = ckpt.info(name)
    if has_nonfinite(ckpt.read(name), info.dtype):
        raise PlanError(
            f"{ckpt.root / info.file}: tensor '{name}' holds NaN or Inf values",
            hint="the file is damaged or the training diverged; qkrestore writes finite values only",
        )
