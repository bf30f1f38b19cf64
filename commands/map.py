"""sage map: transform each record with a Python expression."""

from typing import Annotated

import typer

from sage_cli.cli.command import operator_command, single_command_app
from sage_cli.cli.options import UserFunction

app = single_command_app()


@operator_command(app, "map")
def map_records(
    expr: Annotated[
        str | None,
        typer.Argument(
            metavar="EXPR",
            help="Python expression over the record `r`; must return an object.",
            show_default=False,
        ),
    ] = None,
    fn: UserFunction = None,
):
    """Replace each record with what EXPR returns (an object).

    EXPR is Python over the record `r`, compiled once; `json`, `math` and `re` are available.
    An exception in EXPR is that record's error (see --on-error).

    \b
    Examples:
      sage map 'r | {"n": len(r["text"])}' docs.ndjson
      sage map '{"id": r["id"], "text": r["text"].lower()}'
      sage map --fn mymodule:clean < in.ndjson > out.ndjson
    """
    from sage_cli.operators.expr import Map

    return Map(expr, fn)
