"""sage flatmap: turn each record into zero or more records."""

from typing import Annotated

import typer

from sage_cli.cli.command import operator_command, single_command_app
from sage_cli.cli.options import UserFunction

app = single_command_app()


@operator_command(app, "flatmap")
def flatmap_records(
    expr: Annotated[
        str | None,
        typer.Argument(
            metavar="EXPR",
            help="Python expression over `r` returning a list of objects (or strings).",
            show_default=False,
        ),
    ] = None,
    fn: UserFunction = None,
):
    """Replace each record with the records EXPR returns: a list or generator of objects;
    strings become {"text": ...}; None or [] drops the record.

    \b
    Examples:
      sage flatmap '[{"id": r["id"], "word": w} for w in r["text"].split()]'
      sage flatmap 'r["text"].split("\\n\\n")' docs.ndjson
    """
    from sage_cli.operators.expr import FlatMap

    return FlatMap(expr, fn)
