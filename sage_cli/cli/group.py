"""The `sage` click group: lists and loads the subcommands from the registry. Subcommands are
imported only when they run, so `sage <op> --help` stays fast and no heavy library (numpy,
llama.cpp, rich) loads here. sage_cli.app.main imports this module once it knows the process
runs a command (a keeper of `sage run --retries` never does)."""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import typer
import typer.core

from sage_cli import __version__
from sage_cli.cli.command import CONTEXT
from sage_cli.cli.guard import fail
from sage_cli.verbs import commands

# typer 0.19 escapes option help (\[default: fail]) whenever rich is installed, even with
# rich_markup_mode=None; sage never renders help with rich, so tell typer it is not there.
typer.core.HAS_RICH = False

#: name -> (module in commands/, one-line summary shown by `sage --help`), from the registry
COMMANDS: dict[str, tuple[str, str]] = {v.name: (v.module, v.summary) for v in commands()}


def available_commands() -> list[str]:
    return [name for name, (module, _) in COMMANDS.items() if importlib.util.find_spec(module)]


class LazyGroup(typer.core.TyperGroup):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: Any) -> list[str]:
        return available_commands()

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        entry = COMMANDS.get(cmd_name)
        if entry is None or not importlib.util.find_spec(entry[0]):
            return None
        module = importlib.import_module(entry[0])
        command = typer.main.get_command(module.app)
        command.name = cmd_name
        return command

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        rows = [(name, COMMANDS[name][1]) for name in available_commands()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _version(value: bool) -> None:
    if value:
        print(f"sage {__version__}")
        raise typer.Exit()


app = typer.Typer(
    cls=LazyGroup,
    name="sage",
    help="Unix-style NDJSON operators for LLM pipelines. Each command reads NDJSON on stdin "
    "and writes NDJSON on stdout.\n\n"
    "\b\nExamples:\n"
    "  sage source docs/ | sage chunk | sage embed | sage index build idx/\n"
    "  sage source questions.txt -R | sage retrieve --index idx/ | sage prompt | sage generate\n"
    "  sage <command> --help",
    context_settings=CONTEXT,
    rich_markup_mode=None,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Unix-style NDJSON operators for LLM pipelines."""


def run(args: list[str]) -> int:
    """Run `sage ARGS`: usage errors become one line and exit 2."""
    prog = "sage" if not args or args[0].startswith("-") else f"sage {args[0]}"
    try:
        result = app(args=args, prog_name="sage", standalone_mode=False)
    except Exception as exc:  # click's UsageError and friends: duck-typed, click is vendored
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            ctx = getattr(exc, "ctx", None)
            where = ctx.command_path if ctx is not None else prog
            hint = f" (see '{where} --help')" if ctx is not None else ""
            return fail(where, exc.format_message() + hint, exc.exit_code)
        raise
    return result if isinstance(result, int) else 0
