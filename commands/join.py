"""sage join: enrich records from an NDJSON lookup table."""

from typing import Annotated

import typer

from sage_cli.cli.command import operator_command, single_command_app

app = single_command_app()


@operator_command(app, "join")
def join_records(
    table: Annotated[
        str, typer.Argument(metavar="TABLE", help="NDJSON lookup table.", show_default=False)
    ],
    on: Annotated[
        str,
        typer.Option(
            "--on",
            metavar="KEY",
            help="Field whose value must be equal in the record and the table row.",
            show_default=False,
        ),
    ],
    how: Annotated[
        str,
        typer.Option(
            "--how",
            metavar="inner|left",
            help="inner: drop records with no match; left: pass them unchanged.",
        ),
    ] = "inner",
    prefix: Annotated[
        str | None,
        typer.Option(
            "--prefix",
            metavar="P",
            help="Add the row's fields as P<field> (and let them "
            "overwrite); without it a record's own fields win.",
        ),
    ] = None,
):
    """Add the fields of the TABLE rows whose KEY equals the record's KEY.

    Several matching rows give one record each. A record without KEY is a record error.
    A missing or unreadable TABLE exits 69; a bad line in it exits 69 naming TABLE:LINE.

    \b
    Examples:
      sage join authors.ndjson --on author_id < posts.ndjson
      sage join labels.ndjson --on id --how left --prefix gold_ < answers.ndjson
    """
    from sage_cli.cli.io import read_table
    from sage_cli.errors import SageError, UnavailableError
    from sage_cli.operators.join import Join

    try:
        rows = read_table(table)
    except SageError as err:
        raise UnavailableError(f"lookup table {err}") from None
    return Join(rows, on, how, prefix, table_name=table)
