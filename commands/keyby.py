"""sage keyby: tag each record with a partition key."""

from typing import Annotated

import typer

from sage_cli.cli.command import operator_command, single_command_app

app = single_command_app()


@operator_command(app, "keyby")
def keyby_records(
    field: Annotated[
        str,
        typer.Argument(
            metavar="FIELD",
            help="Field whose value is the key; a.b reads a nested field; a,b makes a "
            "compound key.",
            show_default=False,
        ),
    ],
):
    """Copy the value of FIELD into `_key` (FIELD a,b: the list of their values).

    `window` groups by `_key` when it has no --key; `dedupe --key _key` uses it too. A record
    without the field is a record error (see --on-error).

    \b
    Examples:
      sage keyby user < events.ndjson | sage window --size 10 --agg count
      sage keyby metadata.path | sage dedupe --key _key
      sage keyby user,day < events.ndjson
    """
    from sage_cli.operators.keyby import KeyBy

    return KeyBy([f for f in field.split(",") if f])
