"""The one option model of ``merge`` and ``pro``: declared once, read by the CLI, the API and recipes.

Every option is a field of one of four dataclasses, and the field's metadata says how it reads:

* :class:`~qkrestore.surgery.plan.PlanOptions` — what to restore (``layers``, ``targets``, ...);
* :class:`~qkrestore.surgery.writer.WriteOptions` — how OUT is written (``overwrite``, ``link``, ``jobs``);
* :class:`~qkrestore.job.JobOptions` — what the job does besides (``dry_run``, ``push_to_hub``, ...);
* :class:`ProOptions` — QK-Pro's own (``fix``, ``ridge``, ``form``, ``device``).

A field with ``flags`` metadata is an option: its key (the field's name unless ``key`` says
otherwise) is the Python API's keyword and the recipe's key, its ``flags`` and ``help`` are the
CLI's, and the field's default is the option's default everywhere (the CLI shows it through
``show`` where the field holds a parsed value, e.g. ``layers=None`` shows as ``auto``). One parser
per option turns what a user gives (CLI text, an API keyword, a recipe value) into the field's
value, so the three front ends cannot drift apart. mergekit derives its click options from its
pydantic ``MergeOptions`` the same way; :mod:`qkrestore.cli.options` builds the typer parameters
from :func:`specs`.

Metadata keys: ``flags`` (long spelling first), ``help``, optional ``key``, ``parse`` (a callable
``(key, value) -> field value`` or the name of one in :data:`PARSERS`), ``show``, ``choices`` (with
``cli_enum: False`` the CLI takes free text and the parser checks it), ``min``, ``only`` (the one
command that takes it); ``nested`` marks a field holding another option dataclass.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from .errors import OptionError, PlanError, RecipeError
from .job import JobOptions
from .surgery.methods import Method, QKRestore
from .surgery.plan import PlanOptions, layers_value, targets_value
from .surgery.recipes import read_recipe
from .surgery.writer import WriteOptions

COMMANDS = ("merge", "pro")
METHOD_NAMES = {"merge": "QK-Restore", "pro": "QK-Pro"}


@dataclass(frozen=True)
class ProOptions:
    """QK-Pro's own options: which side is held at PRE, and how the other side is solved."""

    fix: str = field(
        default="key",
        metadata={
            "flags": ("--fix",),
            "help": "Side held at PRE: 'key' solves W_Q, 'query' solves W_K.",
            "choices": ("key", "query"),
        },
    )
    ridge: float = field(
        default=1.0,
        metadata={
            "flags": ("--ridge",),
            "help": "Relaxation R ≥ 0 (λ = R·trace(G)/d_h): 0 gives QK-Restore, large R gives "
            "POST.",
            "min": 0.0,
        },
    )
    form: str = field(
        default="ridge",
        metadata={
            "flags": ("--form",),
            "help": "'ridge' (default): the ridge-relaxed bilinear form; 'cross-gram': keep PRE's "
            "d_h×d_h cross-Gram Q_h K_gᵀ exactly, with the smallest change (ignores --ridge).",
            "choices": ("ridge", "cross-gram"),
            "cli_enum": False,  # checked by the parser, so a wrong value gets the one-line error
        },
    )
    device: str = field(
        default="auto",
        metadata={
            "flags": ("--device",),
            "help": "Where to solve: auto (CUDA if present), cpu, cuda.",
            "choices": ("auto", "cpu", "cuda"),
        },
    )


# -- the specs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptionSpec:
    """One option as every front end sees it, read from its field's metadata."""

    key: str  # API keyword and recipe key
    field: str  # the dataclass field it fills
    owner: type  # the dataclass holding the field
    flags: tuple[str, ...]  # CLI spellings, long first
    help: str
    default: Any  # the field's default: the one place it is written
    kind: type  # what the CLI converts a flag's text to: bool, int, float or str
    optional: bool  # the field may be None
    parse: Callable[[str, Any], Any]
    show: Callable[[Any], Any] | None
    choices: tuple[str, ...]
    cli_enum: bool
    minimum: float | None
    commands: tuple[str, ...]

    @property
    def flag(self) -> str:
        return self.flags[0]

    @property
    def cli_default(self) -> Any:
        """The default as the CLI shows and takes it (``auto`` for ``layers=None``)."""
        return self.default if self.show is None else self.show(self.default)


_REPO_PART = re.compile(r"[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?")


def repo_id_value(option: str, value: Any) -> str | None:
    """A Hub repo id (``org/name`` or ``name``), as huggingface_hub validates one.

    The ids are written into the model card, qkrestore.json and adapter_config.json, which push
    uploads: a local path given here (``--pre-id /home/me/base``) would leak into them.
    """
    if value is None:
        return None
    parts = value.split("/") if isinstance(value, str) else []
    if (
        not 1 <= len(parts) <= 2
        or not all(_REPO_PART.fullmatch(p) for p in parts)
        or ".." in value
        or "--" in value
    ):
        raise OptionError(option, f"{value!r}: give a Hub repo id like org/name (not a path)")
    return value


PARSERS: dict[str, Callable[[str, Any], Any]] = {
    "layers": layers_value,
    "targets": targets_value,
    "repo_id": repo_id_value,
}
_META_KEYS = {"flags", "help", "key", "parse", "show", "choices", "cli_enum", "min", "only"}


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"option field {f.name} has no default")


def _kind(hint: Any) -> tuple[type, bool]:
    """(base type, may be None) of a field's annotation: ``int | None`` → (int, True)."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    base = typing.get_origin(base) or base
    return (base if base in (bool, int, float, str) else str), optional


def _spec(owner: type, f: dataclasses.Field[Any], hint: Any) -> OptionSpec:
    meta = dict(f.metadata)
    unknown = set(meta) - _META_KEYS
    if unknown:
        raise TypeError(f"{owner.__name__}.{f.name}: unknown option metadata {sorted(unknown)}")
    kind, optional = _kind(hint)
    parse = meta.get("parse")
    if isinstance(parse, str):
        parse = PARSERS[parse]
    choices = tuple(meta.get("choices", ()))
    minimum = meta.get("min")
    only = meta.get("only")
    commands = (only,) if only else ("pro",) if owner is ProOptions else COMMANDS
    return OptionSpec(
        key=meta.get("key", f.name),
        field=f.name,
        owner=owner,
        flags=tuple(meta["flags"]),
        help=meta["help"],
        default=_default(f),
        kind=kind,
        optional=optional,
        parse=parse or _checker(kind, optional, minimum),
        show=meta.get("show"),
        choices=choices,
        cli_enum=bool(meta.get("cli_enum", True)) and bool(choices),
        minimum=minimum,
        commands=commands,
    )


def _fields(owner: type) -> list[OptionSpec]:
    """The options of ``owner`` in field order, nested option dataclasses expanded in place."""
    hints = typing.get_type_hints(owner)
    out: list[OptionSpec] = []
    for f in dataclasses.fields(owner):
        if f.metadata.get("nested"):
            out += _fields(hints[f.name])
        elif "flags" in f.metadata:
            out.append(_spec(owner, f, hints[f.name]))
    return out


@cache
def all_specs() -> tuple[OptionSpec, ...]:
    """Every option of ``merge`` and ``pro``: QK-Pro's own, then planning, then the job's."""
    specs = tuple(_fields(ProOptions) + _fields(PlanOptions) + _fields(JobOptions))
    keys = [s.key for s in specs]
    assert len(keys) == len(set(keys)), f"option keys declared twice: {keys}"
    return specs


def specs(command: str) -> tuple[OptionSpec, ...]:
    """The options ``command`` (``merge`` or ``pro``) takes, in the order ``--help`` lists them:
    the command's own first, then the shared ones."""
    mine = [s for s in all_specs() if command in s.commands]
    return tuple(
        sorted(mine, key=lambda s: len(s.commands) > 1)  # stable: own options first
    )


def spec_by_key() -> dict[str, OptionSpec]:
    return {s.key: s for s in all_specs()}


def flag_for(key: str) -> str | None:
    """The CLI spelling of an option named in a library message (``layers`` → ``--layers``)."""
    spec = spec_by_key().get(key)
    return spec.flag if spec else None


# -- parsing --------------------------------------------------------------------------------------


def _checker(kind: type, optional: bool, minimum: float | None) -> Callable[[str, Any], Any]:
    """The parser of a plain option: its value must already be of the field's type."""

    def check(key: str, value: Any) -> Any:
        if value is None and optional:
            return None
        if kind is bool:
            if not isinstance(value, bool):
                raise OptionError(key, f"{value!r}: give true or false")
            return value
        if kind in (int, float):
            ok = isinstance(value, int) or (kind is float and isinstance(value, float))
            if not ok or isinstance(value, bool):
                raise OptionError(key, f"{value!r}: give a number")
            value = kind(value)
            if not math.isfinite(value):  # inf would be recorded as non-JSON "Infinity"
                raise OptionError(key, f"{value}: give a finite number")
            if minimum is not None and not value >= minimum:
                raise OptionError(key, f"{value}: must be ≥ {minimum:g}")
            return value
        if not isinstance(value, str):
            raise OptionError(key, f"{value!r}: give text")
        return value

    return check


def parse_value(spec: OptionSpec, value: Any) -> Any:
    """``value`` (CLI text, API keyword or recipe value) as the field's value, or OptionError."""
    if spec.choices and not (isinstance(value, str) and value in spec.choices):
        raise OptionError(spec.key, f"{value!r}: use {' or '.join(map(repr, spec.choices))}")
    return spec.parse(spec.key, value)


def check_keywords(command: str, keys: list[str]) -> None:
    """Refuse API keywords ``command`` does not take; one of the other command's is named so."""
    mine = {s.key for s in specs(command)}
    for key in keys:
        other = next((c for c in COMMANDS if c != command and key in _keys(c)), None)
        if key not in mine and other is not None:
            raise OptionError(
                key,
                f"an option of {METHOD_NAMES[other]}, which {command}() does not take (call "
                f"qkrestore.{other})",
            )
    unknown = sorted(set(keys) - mine)
    if unknown:
        raise PlanError(
            f"{command}(): unknown option(s) {', '.join(unknown)}",
            hint=f"{command}() takes {', '.join(sorted(mine))}",
        )


def _keys(command: str) -> set[str]:
    return {s.key for s in specs(command)}


def recipe_keywords(path: str | Path, command: str) -> dict[str, Any]:
    """The options a recipe sets, checked against ``command``'s: an unknown key is refused by
    name, and a recipe for the other command (``fix`` given to ``merge``) names that command."""
    data = read_recipe(path)
    mine = _keys(command)
    foreign = [k for k in data if k not in mine]
    for key in foreign:
        for other in COMMANDS:
            if other != command and key in _keys(other):
                raise RecipeError(
                    f"{path}: this is a {METHOD_NAMES[other]} recipe ('{key}' is an option of "
                    f"`qkrestore {other}` only): run `qkrestore {other}`"
                )
    for key in foreign:
        raise RecipeError(
            f"{path}: unknown recipe key '{key}'", hint=f"known keys: {', '.join(sorted(mine))}"
        )
    by_key = spec_by_key()
    out: dict[str, Any] = {}
    for key, value in data.items():
        try:
            out[key] = parse_value(by_key[key], value)
        except OptionError as exc:  # a recipe value: named by its key, in its file
            raise RecipeError(f"{path}: {exc.message}", hint=exc.hint) from None
    return out


# -- building the option objects ------------------------------------------------------------------


@dataclass(frozen=True)
class CommandOptions:
    """Everything ``merge`` or ``pro`` was asked to do, as the pipeline's option objects."""

    command: str
    plan: PlanOptions
    job: JobOptions
    pro: ProOptions | None = None

    def method(self) -> Method:
        """The restore method these options describe."""
        if self.pro is None:
            return QKRestore(self.plan)
        from .qkpro.method import QKPro  # torch is imported only by the jobs that compute

        p = self.pro
        return QKPro(self.plan, fix=p.fix, ridge=p.ridge, device=p.device, form=p.form)


def resolve(
    command: str,
    output: str | Path,
    keywords: Mapping[str, Any],
    *,
    recipe: str | Path | None = None,
) -> CommandOptions:
    """``command``'s option objects from keywords (API keywords, or the flags given on a command
    line) over a recipe's keys; what neither gives keeps its field's default.

    Every front end ends here, so a recipe, an API keyword and a flag mean the same thing.
    """
    if command not in COMMANDS:
        raise ValueError(f"no option model for {command!r}")
    check_keywords(command, list(keywords))
    by_key = spec_by_key()
    values = recipe_keywords(recipe, command) if recipe is not None else {}
    values |= {k: parse_value(by_key[k], v) for k, v in keywords.items()}
    per_owner: dict[type, dict[str, Any]] = {}
    for key, value in values.items():
        spec = by_key[key]
        per_owner.setdefault(spec.owner, {})[spec.field] = value
    plan = PlanOptions(**per_owner.get(PlanOptions, {}))
    write = WriteOptions(**per_owner.get(WriteOptions, {}))
    job = JobOptions(output=Path(output), write=write, **per_owner.get(JobOptions, {}))
    pro = ProOptions(**per_owner.get(ProOptions, {})) if command == "pro" else None
    return CommandOptions(command, plan, job, pro)


def describe(command: str) -> str:
    """The options of ``command`` as a docstring section (the API's functions append it)."""
    lines = []
    for s in specs(command):
        default = s.cli_default
        lines.append(f"    {s.key} (default {default!r}): {s.help}")
    return "\n".join(lines)


__all__ = [
    "COMMANDS",
    "CommandOptions",
    "OptionSpec",
    "ProOptions",
    "all_specs",
    "describe",
    "flag_for",
    "recipe_keywords",
    "resolve",
    "specs",
]
