"""sage source: read files, directories, globs or stdin as records."""

from typing import Annotated

import typer

from sage_cli.command import operator_command, single_command_app

app = single_command_app()


@operator_command(app, "source")
def source_records(
    paths: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="[PATH]...",
            help="Files, directories (read recursively), globs, or `-` for stdin (the default).",
            show_default=False,
        ),
    ] = None,
    raw: Annotated[
        bool,
        typer.Option(
            "--raw",
            "-R",
            help='Every non-blank line becomes a record {"id": "FILE:LINE", "text": LINE}.',
        ),
    ] = False,
    id_by: Annotated[
        str,
        typer.Option(
            "--id-by",
            metavar="path|content",
            help="Ids for records without one: the path "
            "(FILE, FILE:LINE) or a hash of the content.",
        ),
    ] = "path",
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            metavar="auto|text|ndjson|json|csv",
            help="Read every input as this format "
            "instead of guessing from the extension (stdin: ndjson).",
        ),
    ] = "auto",
    watch: Annotated[
        bool,
        typer.Option(
            "--watch",
            help="Keep running: emit every file, then each new or changed file again, "
            "until Ctrl-C.",
        ),
    ] = False,
):
    """Read files, directories, globs or stdin as records.

    .txt/.md: one record per file {"id", "text", "metadata": {"path", "mtime", "bytes"}}
    (invalid UTF-8 is replaced and noted in metadata.warning). .ndjson/.jsonl: records as they
    are (`content` is renamed `text`). .json: an array of objects or one object. .csv: one record
    per row, fields from the header. Records keep their own `id`; others get FILE, FILE:LINE or
    FILE:N, or a content hash with --id-by content. Directories are read recursively in sorted
    order (hidden entries and unknown extensions skipped).

    \b
    Examples:
      sage source docs/ | sage chunk
      sage source 'notes/**/*.md' --id-by content
      sage source questions.txt -R
      tail -f log.txt | sage source -R -
      sage source --watch inbox/ | sage embed
    """
    import sys

    from sage_cli.operators.source import Source

    op = Source(paths, raw=raw, id_by=id_by, fmt=fmt, watch=watch, stdin=sys.stdin.buffer)
    return op, op.records()
