"""sage merge: interleave several NDJSON inputs as they arrive."""

from typing import Annotated

import typer

from sage_cli.cli.command import operator_command, single_command_app

app = single_command_app()


@operator_command(app, "merge")
def merge_records(
    inputs: Annotated[
        list[str],
        typer.Argument(
            metavar="INPUT...", help="NDJSON files or FIFOs; `-` is stdin.", show_default=False
        ),
    ],
    tag: Annotated[
        str,
        typer.Option(
            "--tag", metavar="FIELD", help="Field that records which input a record came from."
        ),
    ] = "_source",
):
    """Interleave records from several NDJSON inputs in the order they arrive (each input's
    own order is kept), tagging each with its input's name. Ends when every input has ended.

    \b
    Examples:
      sage merge a.ndjson b.ndjson
      mkfifo q1 q2; sage merge q1 q2 --tag stream | sage sink
      producer | sage merge - backlog.ndjson
    """
    import sys

    from sage_cli.operators.merge import Merge

    op = Merge(inputs, tag, stdin=sys.stdin.buffer)
    return op, op.records()
