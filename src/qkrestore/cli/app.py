"""The ``qkrestore`` Typer application and its one error map.

Errors of the tool's own type become one line on stderr and a meaningful exit code; a traceback is
shown only with ``--debug``. ``--json`` puts exactly one JSON document on stdout; everything meant
for humans goes to stderr in that mode. Commands are added to :data:`app` by the package's
``__init__``.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Annotated, Any

import typer
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from .._version import __version__
from ..errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    EXIT_USAGE,
    QKRestoreError,
    render,
)
from ..options import flag_for
from .helptext import command_page, group_page, short_help, usage_pieces
from .output import EXIT_CODES_HELP, STATE, err_console


class HelpCommand(TyperCommand):
    """A command whose ``--help`` page and usage line qkrestore lays out (see :mod:`.helptext`)."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return usage_pieces(self.get_params(ctx))

    def format_help(self, ctx: Any, formatter: Any) -> None:
        formatter.write(
            command_page(ctx.command_path, self.get_params(ctx), self.help, self.epilog)
        )


class HelpGroup(TyperGroup):
    """The application, with its ``--help`` page laid out by :mod:`.helptext`."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return ["[OPTIONS]", "COMMAND", "[ARGS]..."]

    def format_help(self, ctx: Any, formatter: Any) -> None:
        commands = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not getattr(command, "hidden", False):
                commands.append((name, short_help(command)))
        formatter.write(group_page(ctx.command_path, self.get_params(ctx), self.help, commands))


class QKRestoreApp(typer.Typer):
    """A Typer whose commands render their help with :class:`HelpCommand` unless told otherwise."""

    def command(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("cls", HelpCommand)
        return super().command(*args, **kwargs)


app = QKRestoreApp(
    cls=HelpGroup,
    name="qkrestore",
    help="Checkpoint surgery for hybrid LLMs: bring back long-range recall after CoT fine-tuning "
    "by restoring the query/key routing of softmax-attention layers from the pre-SFT checkpoint.\n\n"
    + EXIT_CODES_HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


class Terminated(BaseException):
    """Raised from the SIGTERM handler so that cleanup (temporary folders) runs as for Ctrl-C."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def _version(value: bool) -> None:
    if value:
        print(f"qkrestore {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show full tracebacks for errors.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    STATE["debug"] = debug or bool(os.environ.get("QKRESTORE_DEBUG"))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and turn every failure into a one-line message and an exit code."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        STATE["argv"] = list(sys.argv[1:] if argv is None else argv)
        rv = app(args=argv, standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except QKRestoreError as exc:
        if STATE["debug"]:
            raise
        # Library messages name options as the API does (``layers``); the CLI shows its flags.
        message = render(exc, flag_for)
        err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.TyperException as exc:  # usage errors: unknown option, missing argument, ...
        show = getattr(exc, "show", None)  # click's rendering; typer's stub does not declare it
        if callable(show):
            show()
        return EXIT_USAGE
    except (KeyboardInterrupt, typer.Abort):
        err_console.print("interrupted: no partial output was left behind", highlight=False)
        return EXIT_INTERRUPTED
    except Terminated:
        err_console.print("terminated: no partial output was left behind", highlight=False)
        return EXIT_TERMINATED
    except OSError as exc:
        if STATE["debug"]:
            raise
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        err_console.print(
            f"[red]error:[/red] {where}{exc.strerror or exc}",
            highlight=False,
            soft_wrap=True,
        )
        return EXIT_USAGE
    except Exception as exc:
        if STATE["debug"]:
            raise
        err_console.print(
            f"[red]internal error:[/red] {type(exc).__name__}: {exc} (rerun with --debug for the "
            "traceback and please report it)",
            highlight=False,
            soft_wrap=True,
        )
        return EXIT_INTERNAL
    finally:
        signal.signal(signal.SIGTERM, previous)
