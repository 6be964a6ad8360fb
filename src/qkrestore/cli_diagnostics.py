"""Diagnostic commands (drift, attn-distance, autocorr, niah), registered on the main app."""

from __future__ import annotations

import typer
from rich.console import Console


def register(app: typer.Typer, out_console: Console, err_console: Console) -> None:
    """Add the diagnostic commands to ``app``; called once by :mod:`qkrestore.cli`."""
