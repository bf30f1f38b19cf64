"""sage head: pass the first N records and stop reading."""

from typing import Annotated

import typer

from sage_cli.cli.command import operator_command, single_command_app

app = single_command_app()


@operator_command(app, "head")
def head_records(
    n: Annotated[int, typer.Argument(metavar="N", help="How many records to pass.", min=0)] = 10,
):
    """Pass the first N records (default 10) and stop reading, so the stage before ends too.

    \b
    Examples:
      sage source docs/ | sage head 3
      yes '{"a": 1}' | sage head 5
    """
    from sage_cli.operators.head import Head

    return Head(n)
