"""``--help`` pages rendered by qkrestore itself, the same on every Typer the requirement allows.

Typer's own help changed under us: 0.26 vendored Click and 0.29 shows required arguments as
``{pre}``, every flag as ``<bool>`` (so users try ``--dry-run true``, which is refused), and squeezes
option names and choices into a rich table until they are cut (``--trust-remote-c...``); examples
in an epilog run together on every version. So the pages are laid out here, from the parameters
Click and Typer both expose, as plain text: a usage line with upper-case argument names, each
option with its value's kind (none for a flag) and its choices in full, help wrapped to the
terminal (``COLUMNS``), and the examples kept line for line. Help strings keep using Rich markup
(``[bold]``): it is rendered to plain text, as ``rich_markup_mode="rich"`` would have read it.
"""

from __future__ import annotations

import enum
import inspect
import re
import shutil
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import PurePath
from typing import Any

MIN_WIDTH = 40
MAX_WIDTH = 100
TERM_COLUMN = 30  # an option wider than this puts its help on the next line, as Click's does
INDENT = 2


def page_width() -> int:
    """The terminal's width (``COLUMNS`` wins), kept between 40 and 100 columns for reading."""
    return max(MIN_WIDTH, min(shutil.get_terminal_size((80, 24)).columns, MAX_WIDTH))


def plain(text: str | None, *, dedent: bool = True) -> str:
    """Help text as Rich would show it, without styles; text Rich cannot parse is kept as is.
    Docstrings are dedented; an epilog is not (its examples are indented on purpose)."""
    if not text:
        return ""
    from rich.errors import MarkupError
    from rich.text import Text

    if dedent:
        text = inspect.cleandoc(text)
    try:
        return Text.from_markup(text).plain
    except MarkupError:
        return text


# -- what a parameter is ---------------------------------------------------------------------------


def _is_argument(param: Any) -> bool:
    return getattr(param, "param_type_name", "") == "argument"


def _is_flag(param: Any) -> bool:
    return bool(getattr(param, "is_flag", False)) or bool(getattr(param, "count", False))


def _choices(param: Any) -> list[str] | None:
    """The values a choice parameter takes: Click's ``Choice`` type, or Typer's type descriptor."""
    desc = getattr(param, "type_descriptor", None)
    found = None
    if desc is not None and getattr(desc, "is_choice", False):
        found = getattr(desc, "choices", None)
    if found is None:
        found = getattr(getattr(param, "type", None), "choices", None)
    if not found:
        return None
    return [str(c.value) if isinstance(c, enum.Enum) else str(c) for c in found]


_KINDS = {str: "TEXT", int: "INTEGER", float: "FLOAT", bool: "BOOLEAN"}
_KIND_NAMES = {
    "str": "TEXT",
    "text": "TEXT",
    "int": "INTEGER",
    "integer": "INTEGER",
    "path": "PATH",
}


def _kind(param: Any) -> str:
    """The kind of value an option takes (TEXT, INTEGER, PATH, ...), as Click names it."""
    desc = getattr(param, "type_descriptor", None)
    annotation = getattr(desc, "annotation", None)
    if isinstance(annotation, type):
        if issubclass(annotation, PurePath):
            return "PATH"
        if annotation in _KINDS:
            return _KINDS[annotation]
    name = getattr(getattr(param, "type", None), "name", None)
    if isinstance(name, str) and name:
        name = name.lower().replace(" range", "")
        return _KIND_NAMES.get(name, name.upper())
    return "VALUE"


def _range(param: Any) -> str | None:
    """``x>=1``-style bounds of a number option (Typer keeps them on the parameter in 0.29, Click
    on its ``IntRange``/``FloatRange`` type)."""
    for holder in (param, getattr(param, "type", None)):
        lo, hi = getattr(holder, "min", None), getattr(holder, "max", None)
        if lo is not None or hi is not None:
            if lo is not None and hi is not None:
                return f"{lo}<=x<={hi}"
            return f"x>={lo}" if lo is not None else f"x<={hi}"
    return None


def _default(param: Any) -> str | None:
    show = getattr(param, "show_default", None)
    if isinstance(show, str):
        return show
    if not show or _is_flag(param):
        return None
    value = getattr(param, "default", None)
    if callable(value) or value is None or value == "" or value == () or value == []:
        return None
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v.value if isinstance(v, enum.Enum) else v) for v in value)
    return str(value)


def argument_name(param: Any) -> str:
    """An argument as the usage line names it: its metavar, else its name in capitals."""
    name = getattr(param, "metavar", None) or (param.name or "").upper()
    return name + ("..." if getattr(param, "nargs", 1) != 1 else "")


def option_term(param: Any) -> str:
    """``-o, --output PATH``: short names first, then long, then the value (none for a flag)."""
    names = sorted(param.opts, key=lambda o: (o.startswith("--"), o))
    term = ", ".join(names)
    secondary = list(getattr(param, "secondary_opts", []) or [])
    if secondary:
        term += " / " + ", ".join(secondary)
    if not _is_flag(param):
        metavar = getattr(param, "metavar", None)
        choices = _choices(param)
        if metavar:
            term += f" {metavar}"
        elif choices:
            term += " [" + "|".join(choices) + "]"
        else:
            term += f" {_kind(param)}"
        if getattr(param, "multiple", False):
            term += " ..."
    return term


def parameter_help(param: Any) -> str:
    text = plain(getattr(param, "help", None))
    extra = []
    default = _default(param)
    if default is not None:
        extra.append(f"default: {default}")
    bounds = _range(param)
    if bounds:
        extra.append(bounds)
    if getattr(param, "required", False):
        extra.append("required")
    if extra:
        text = f"{text}  [{'; '.join(extra)}]" if text else f"[{'; '.join(extra)}]"
    return text


def usage_pieces(params: Iterable[Any]) -> list[str]:
    """``[OPTIONS] PRE POST``: what the usage line shows after the command's name."""
    pieces = ["[OPTIONS]"]
    for p in params:
        if _is_argument(p) and not getattr(p, "hidden", False):
            name = argument_name(p)
            pieces.append(name if getattr(p, "required", False) else f"[{name}]")
    return pieces


# -- layout ----------------------------------------------------------------------------------------

_TOKEN = re.compile(r"""'[^']*'|"[^"]*"|\S+""")
_COMMENT = re.compile(r"\s{2,}#\s")


def _option_groups(tokens: list[str]) -> list[str]:
    """``--samples 20`` stays together when an example is split over lines."""
    out: list[str] = []
    for token in tokens:
        if out and out[-1].startswith("-") and " " not in out[-1] and not token.startswith("-"):
            out[-1] += " " + token
        else:
            out.append(token)
    return out


def shell_lines(line: str, width: int) -> list[str]:
    """An example command that is wider than the page, split at spaces outside quotes and continued
    with `` \\`` (so it still pastes into a shell as one command); a trailing ``# comment``
    goes on a line of its own above it. Lines that fit are returned as they are."""
    if len(line) <= width:
        return [line]
    indent = line[: len(line) - len(line.lstrip())]
    code, comment = line, ""
    found = _COMMENT.search(line)
    if found:
        code, comment = line[: found.start()], line[found.end() - 2 :].strip()
    out = [indent + comment] if comment else []
    if len(code) <= width:
        return [*out, code]
    current = indent
    for token in _option_groups(_TOKEN.findall(code)):
        candidate = token if current.strip() == "" else f"{current} {token}"
        if current.strip() and len(indent + candidate.strip()) + 2 > width:
            out.append(current + " \\")
            current = indent + "    " + token
        else:
            current = (current + token) if current.strip() == "" else candidate
    out.append(current)
    return out


def _wrap(text: str, width: int, indent: int) -> list[str]:
    """Paragraphs rewrapped to ``width`` at ``indent``; a paragraph whose lines are indented
    (examples, commands) or that starts with Click's ``\\b`` keeps its lines as written."""
    out: list[str] = []
    pad = " " * indent
    for para in text.split("\n\n"):
        lines = para.strip("\n").splitlines()
        if not lines:
            continue
        if out:
            out.append("")
        if lines[0].strip() == "\b":
            out += [x for line in lines[1:] for x in shell_lines(pad + line, width)]
        elif all(line.startswith("  ") for line in lines):
            out += [x for line in lines for x in shell_lines(pad + line, width)]
        elif len(lines) > 1 and all(line.startswith("  ") for line in lines[1:]):
            out.append(pad + lines[0])  # a heading line, then verbatim lines
            out += [x for line in lines[1:] for x in shell_lines(pad + line, width)]
        else:
            out += textwrap.wrap(
                " ".join(line.strip() for line in lines),
                width=max(width - indent, 20),
                initial_indent=pad,
                subsequent_indent=pad,
                break_on_hyphens=False,
                break_long_words=False,
            )
    return out


def _breakable(text: str, width: int) -> str:
    """A comma list wider than the column (``pre,post,restore,...``) gets a space after each comma,
    so that it wraps between items rather than running past the page's edge."""
    return " ".join(w.replace(",", ", ") if len(w) > width else w for w in text.split(" "))


def definition_list(rows: Sequence[tuple[str, str]], width: int) -> list[str]:
    """Terms and their help in two columns, as Click lays them out: a term wider than the first
    column puts its help on the next line, so no name is ever cut."""
    if not rows:
        return []
    term_width = min(max(len(t) for t, _ in rows), TERM_COLUMN)
    help_at = INDENT + term_width + 2
    help_width = max(width - help_at, 20)
    out: list[str] = []
    for term, text in rows:
        wrapped = textwrap.wrap(
            _breakable(text, help_width),
            width=help_width,
            break_on_hyphens=False,
            break_long_words=False,
        ) or [""]
        first = " " * INDENT + term
        if len(term) <= term_width:
            out.append((first.ljust(help_at) + wrapped[0]).rstrip())
            rest = wrapped[1:]
        else:
            out.append(first)
            rest = wrapped
        out += [" " * help_at + line for line in rest]
    return out


def usage_line(command_path: str, pieces: Sequence[str], width: int) -> list[str]:
    head = f"Usage: {command_path} "
    return textwrap.wrap(
        " ".join(pieces),
        width=width,
        initial_indent=head,
        subsequent_indent=" " * len(head),
        break_on_hyphens=False,
        break_long_words=False,
    ) or [head.rstrip()]


def command_page(
    command_path: str,
    params: Sequence[Any],
    help_text: str | None,
    epilog: str | None,
    width: int | None = None,
) -> str:
    """The whole ``--help`` page of a command."""
    width = width or page_width()
    visible = [p for p in params if not getattr(p, "hidden", False)]
    lines = usage_line(command_path, usage_pieces(visible), width)
    body = plain(help_text)
    if body:
        lines += ["", *_wrap(body, width, INDENT)]
    arguments = [(argument_name(p), parameter_help(p)) for p in visible if _is_argument(p)]
    if arguments:
        lines += ["", "Arguments:", *definition_list(arguments, width)]
    options = [(option_term(p), parameter_help(p)) for p in visible if not _is_argument(p)]
    if options:
        lines += ["", "Options:", *definition_list(options, width)]
    tail = plain(epilog, dedent=False)
    if tail:
        lines += ["", *_wrap(tail, width, 0)]
    return "\n".join(lines) + "\n"


def group_page(
    command_path: str,
    params: Sequence[Any],
    help_text: str | None,
    commands: Sequence[tuple[str, str]],
    width: int | None = None,
) -> str:
    """The ``--help`` page of the application: its options and one line per command."""
    width = width or page_width()
    visible = [p for p in params if not getattr(p, "hidden", False)]
    lines = usage_line(command_path, ["[OPTIONS]", "COMMAND", "[ARGS]..."], width)
    body = plain(help_text)
    if body:
        lines += ["", *_wrap(body, width, INDENT)]
    options = [(option_term(p), parameter_help(p)) for p in visible if not _is_argument(p)]
    if options:
        lines += ["", "Options:", *definition_list(options, width)]
    if commands:
        lines += ["", "Commands:", *definition_list(list(commands), width)]
    return "\n".join(lines) + "\n"


def short_help(command: Any) -> str:
    """A command's first sentence, for the application's command list."""
    text = plain(getattr(command, "short_help", None) or getattr(command, "help", None))
    first = text.split("\n\n")[0].replace("\n", " ").strip()
    end = re.search(r"\.\s+(?=[A-Z])", first)  # not at "(Eq. 3)"
    return first[: end.start() + 1] if end else first
