"""Family adapters (filled in by the adapters work of issue 3)."""

from __future__ import annotations

from .base import Adapter

FAMILIES: tuple[Adapter, ...] = ()
