"""sage dedupe: drop records whose key was already seen."""

from typing import Annotated

import typer

from sage_cli.cli.command import operator_command, single_command_app

app = single_command_app()


@operator_command(app, "dedupe")
def dedupe_records(
    key: Annotated[
        list[str] | None,
        typer.Option(
            "--key",
            "-k",
            metavar="FIELD",
            help="Field that identifies a record (default: id); "
            "repeat for a compound key; a.b reads a nested field.",
            show_default=False,
        ),
    ] = None,
    max_keys: Annotated[
        int | None,
        typer.Option(
            "--max-keys",
            metavar="N",
            min=1,
            help="Remember only the N most recently seen keys "
            "(bounded memory for endless streams).",
        ),
    ] = None,
):
    """Pass the first record with each key and drop the later ones, in input order.

    A record without the key field is a record error (see --on-error).

    \b
    Examples:
      sage source docs/ --id-by content | sage dedupe
      sage dedupe --key url --key lang < pages.ndjson
      tail -f events.ndjson | sage dedupe --key event_id --max-keys 100000
    """
    from sage_cli.operators.dedupe import Dedupe

    return Dedupe(key, max_keys)
