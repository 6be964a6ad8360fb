"""Recipes: a YAML file holding any of a command's options, e.g. ``configs/hypenet-9b.yaml``.

A recipe fills in defaults; options given on the command line win. Keys are option names with
dashes or underscores (``include-sliding`` or ``include_sliding``); lists are accepted where the
option takes a comma list (``layers: [1, 2, 4]``). Unknown keys are refused, so a typo cannot pass
silently.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from .errors import QKRestoreError

LIST_OPTIONS = {"layers", "targets", "expect_layers"}


def load_recipe(path: Path, params: Iterable[tuple[str, Iterable[str]]]) -> dict[str, Any]:
    """Read ``path`` and map its keys to parameter names.

    ``params`` pairs each parameter name with its option spellings (``--include-sliding``).
    """
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise QKRestoreError(f"{path}: cannot read recipe ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise QKRestoreError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise QKRestoreError(f"{path}: a recipe must be a mapping of option names to values")
    names: dict[str, str] = {}
    for name, opts in params:
        names[name] = name
        for opt in opts:
            if opt.startswith("--"):
                names[opt[2:].replace("-", "_")] = name
    out: dict[str, Any] = {}
    for key, value in data.items():
        norm = str(key).replace("-", "_")
        if norm not in names or norm in ("config", "help"):
            known = ", ".join(sorted(k for k in names if k not in ("config", "help")))
            raise QKRestoreError(f"{path}: unknown recipe key '{key}'", hint=f"known keys: {known}")
        target = names[norm]
        if target in LIST_OPTIONS and isinstance(value, list):
            value = ",".join(str(v) for v in value)
        out[target] = value
    return out
