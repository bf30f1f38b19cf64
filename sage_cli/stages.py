"""Turn one `sage VERB ARGS...` command line into the operator call it would run, without
running it: the same parsing (typer) and the same build function as the command itself, so an
engine that runs the stage elsewhere (Ray) builds exactly the operator the CLI would."""

from __future__ import annotations

import os

from sage_cli.command import CAPTURE, OperatorCall
from sage_cli.errors import UsageError

#: flags `operator_command` adds to every operator command
OPERATOR_FLAGS = {"on_error", "batch_size", "schema", "workers"}


def stage_words(argv: list[str]) -> list[str]:
    """`argv` without a leading `sage` (or a path to it)."""
    if argv and os.path.basename(argv[0]) == "sage":
        return list(argv[1:])
    return list(argv)


def parse_stage(argv: list[str]) -> OperatorCall:
    """The OperatorCall of `sage VERB ARGS...` (with or without the leading `sage`).

    Raises UsageError for an unknown command, a command that is not an operator (`run`,
    `models`) or flags the command rejects.
    """
    words = stage_words(argv)
    if not words:
        raise UsageError("empty stage: expected `sage COMMAND ...`")
    from sage_cli.app import COMMANDS, app

    verb = words[0]
    if verb not in COMMANDS:
        raise UsageError(f"`{verb}` is not a sage command (see `sage --help`)")
    import importlib

    import typer.main

    command = typer.main.get_command(importlib.import_module(COMMANDS[verb][0]).app)
    # every operator command carries the common I/O flags; anything else (a group such as
    # `models`, a command such as `run`) must not be started just to parse it
    names = {getattr(p, "name", None) for p in getattr(command, "params", [])}
    if not OPERATOR_FLAGS <= names:
        raise UsageError(f"sage {verb} is not an operator over records; it cannot be a stage here")
    captured: list[OperatorCall] = []
    token = CAPTURE.set(captured)
    try:
        app(args=words, prog_name="sage", standalone_mode=False)
    except Exception as exc:  # click's usage errors, duck-typed like sage_cli.app.main
        if hasattr(exc, "format_message"):
            raise UsageError(f"sage {verb}: {exc.format_message()}") from None
        raise
    finally:
        CAPTURE.reset(token)
    if not captured:
        raise UsageError(f"sage {verb} is not an operator over records; it cannot be a stage here")
    return captured[0]
