"""sage sink: write records to the terminal or a file."""

from typing import Annotated

import typer

from sage_cli.cli.command import operator_command, single_command_app

app = single_command_app()


@operator_command(app, "sink")
def sink_records(
    to: Annotated[
        str | None,
        typer.Option(
            "--to",
            metavar="FILE",
            help="Write to FILE atomically (a temporary file that replaces "
            "FILE only when the run succeeds).",
        ),
    ] = None,
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            metavar="ndjson|json|csv|md|llm",
            help="Output format (default ndjson; csv and md are written when input ends; llm: "
            '{"id", "content"} lines for `llm embed-multi --format nl`).',
            show_default=False,
        ),
    ] = None,
    pretty: Annotated[
        bool | None,
        typer.Option(
            "--pretty/--no-pretty",
            help="Render records for reading (default: when stdout is a "
            "terminal and no --format or --to is given).",
            show_default=False,
        ),
    ] = None,
):
    """Write records: on a terminal, rendered for reading (fields aligned, long text wrapped);
    otherwise NDJSON on stdout, unchanged; with --to FILE, into FILE atomically. csv columns are
    the union of the top-level fields (nested values as JSON); md is a markdown table.
    Records with `_error` pass through to stdout.

    \b
    Examples:
      sage source docs/ | sage head 3 | sage sink
      sage source docs/ | sage map 'r | {"n": len(r["text"])}' | sage sink --to out.ndjson
      sage sink --format csv --to table.csv < records.ndjson
      sage sink --format md < results.ndjson
      sage chunk docs.ndjson | sage sink --format llm | llm embed-multi docs - --format nl
    """
    import sys

    from sage_cli.operators.sink import Sink

    if pretty is None:
        pretty = fmt is None and to is None and sys.stdout.isatty()
    return Sink(
        fmt or "ndjson",
        to,
        stream=getattr(sys.stdout, "buffer", None),  # None: a notebook's stdout (Python API)
        pretty=pretty,
        console_file=sys.stdout,
    )
