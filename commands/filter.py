"""sage filter: keep records for which a Python expression is true."""

from typing import Annotated

import typer

from sage_cli.cli.command import operator_command, single_command_app
from sage_cli.cli.options import UserFunction

app = single_command_app()


@operator_command(app, "filter")
def filter_records(
    expr: Annotated[
        str | None,
        typer.Argument(
            metavar="EXPR", help="Python expression over the record `r`.", show_default=False
        ),
    ] = None,
    fn: UserFunction = None,
    invert: Annotated[
        bool, typer.Option("--invert", "-v", help="Keep the records for which EXPR is false.")
    ] = False,
):
    """Keep the records for which EXPR is true.

    \b
    Examples:
      sage filter 'len(r["text"]) > 200' docs.ndjson
      sage filter '"python" in r["text"].lower()'
      sage filter -v 'r.get("draft")'
    """
    from sage_cli.operators.expr import Filter

    return Filter(expr, fn, invert=invert)
