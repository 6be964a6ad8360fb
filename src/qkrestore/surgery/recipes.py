"""Recipes: a YAML file holding any of a command's options, e.g. ``configs/hypenet-9b.yaml``.

A recipe fills in defaults; options given on the command line (or as API keywords) win. Keys are
option names with dashes or underscores (``include-sliding`` or ``include_sliding``); lists are
accepted where the option takes a comma list (``layers: [1, 2, 4]``). Unknown keys are refused, so
a typo cannot pass silently; which keys ``merge`` and ``pro`` take is the option model's business
(:mod:`qkrestore.options`), this module only reads the file safely.

A recipe comes from elsewhere as often as a checkpoint does, so it is read as untrusted input: at
most :data:`MAX_RECIPE_BYTES`, no YAML anchors or aliases (nested aliases expand a few hundred bytes
into billions of entries), and every value a plain scalar or a list of scalars.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]  # (types-PyYAML is not a dependency)

from ..errors import RecipeError

MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few options; anything larger is not one
SCALARS = (str, int, float, bool, type(None))
LIST_OPTIONS = {"layers", "targets", "expect_layers"}


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The recipe at ``path`` as ``{key: value}``: keys with underscores, values scalars or lists
    of scalars. Every refusal is a :class:`RecipeError` naming the file."""
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                what = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
                raise RecipeError(f"{path}: not a recipe ({what})")
            raw = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe ({exc.strerror or exc})") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(
            f"{path}: not a recipe (over {MAX_RECIPE_BYTES // 1024} KiB; a recipe is a few options)"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a recipe (not UTF-8 text)") from None
    try:
        _refuse_aliases(path, text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of option names to values")
    out: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise RecipeError(f"{path}: recipe key {key!r} is not an option name")
        norm = key.replace("-", "_")
        if norm in out:
            raise RecipeError(f"{path}: recipe key '{key}' is given twice")
        _check_value(path, key, value)
        out[norm] = value
    return out


def _refuse_aliases(path: Path, text: str) -> None:
    """Refuse anchors and aliases before anything is built: a recipe has no use for them, and
    nested aliases are how 519 bytes of YAML expand into 10^9 list entries. A key given twice in
    the top mapping is refused too: PyYAML would keep the last one without a word."""
    depth = 0  # 1 inside the top mapping, where events alternate key, value
    expect_key = True
    seen: set[str] = set()
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        line = event.start_mark.line + 1 if event.start_mark else "?"
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise RecipeError(
                f"{path}: line {line}: YAML anchors and aliases (&name, *name) are not allowed "
                "in a recipe"
            )
        opens = isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent))
        closes = isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent))
        if depth == 1 and expect_key and isinstance(event, yaml.ScalarEvent):
            key = str(event.value).replace("-", "_")
            if key in seen:
                raise RecipeError(f"{path}: line {line}: recipe key '{event.value}' is given twice")
            seen.add(key)
        if opens:
            depth += 1
        elif closes:
            depth -= 1
        if depth == 1 and (isinstance(event, yaml.ScalarEvent) or closes):
            expect_key = not expect_key if not closes else True


def _check_value(path: Path, key: str, value: Any) -> None:
    if isinstance(value, SCALARS):
        return
    if isinstance(value, list) and all(isinstance(v, SCALARS) for v in value):
        return
    what = (
        "a list holding a " + _kind(next(v for v in value if not isinstance(v, SCALARS)))
        if isinstance(value, list)
        else "a " + _kind(value)
    )
    raise RecipeError(
        f"{path}: recipe key '{key}' must be a plain value (text, number, true/false) or a list "
        f"of them, not {what}"
    )


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "mapping"
    return "list" if isinstance(value, list) else type(value).__name__


def load_recipe(path: Path, params: Iterable[tuple[str, Iterable[str]]]) -> dict[str, Any]:
    """Read ``path`` and map its keys to the parameters of a command that takes its recipe as
    defaults (``sweep --config``).

    ``params`` pairs each parameter name with its option spellings (``--include-sliding``).
    ``merge`` and ``pro`` read recipes through the option model instead
    (:func:`qkrestore.options.recipe_keywords`).
    """
    data = read_recipe(path)
    names: dict[str, str] = {}
    for name, opts in params:
        names[name] = name
        for opt in opts:
            if opt.startswith("--"):
                names[opt[2:].replace("-", "_")] = name
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names or key in ("config", "help"):
            known = ", ".join(sorted(k for k in names if k not in ("config", "help")))
            raise RecipeError(f"{path}: unknown recipe key '{key}'", hint=f"known keys: {known}")
        target = names[key]
        if target in LIST_OPTIONS and isinstance(value, list):
            value = ",".join(str(v) for v in value)
        out[target] = value
    return out
