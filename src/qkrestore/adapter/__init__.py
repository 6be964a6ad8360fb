"""PEFT LoRA/DoRA adapters as POST: QK-Restore and QK-Pro on POST = PRE + adapter.

Public entry points (plain functions, no printing): :func:`is_adapter_source`,
:func:`inspect_adapter`, :func:`verify_adapter_output`, :func:`is_adapter_record`; the job pipeline
(:func:`qkrestore.job.run_job`) uses the rest of :mod:`qkrestore.adapter.job`. Only the source
probes (``is_adapter_source``, ``adapter_source``) are imported eagerly: they need no torch, so a plain
``qkrestore merge`` that asks "is POST an adapter?" does not pay torch's start-up.
"""

from __future__ import annotations

from typing import Any

from .config import is_adapter_folder as is_adapter_source
from .source import adapter_source

_LAZY = (
    "inspect_adapter",
    "is_adapter_record",
    "merged_post",
    "open_adapter_input",
    "plan_adapter_job",
    "verify_adapter_output",
    "write_adapter_output",
    "write_merged_post",
)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import job

        return getattr(job, name)
    raise AttributeError(name)


__all__ = ["adapter_source", "is_adapter_source", *_LAZY]
