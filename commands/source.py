"""sage source: read files, directories, globs or stdin as records."""

from typing import Annotated

import typer

from sage_cli.cli.command import operator_command, single_command_app

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
            metavar="auto|text|ndjson|json|csv|pdf|html|docx",
            help="Read every input as this format instead of guessing from the extension "
            "(stdin: ndjson); in directories every file is then read.",
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
    convert: Annotated[
        list[str] | None,
        typer.Option(
            "--convert",
            metavar="EXT=COMMAND",
            help="Read .EXT files through COMMAND (file on its stdin, text on its stdout; "
            "split like a shell would, run without one). Repeatable.",
            show_default=False,
        ),
    ] = None,
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", help="List every skipped file on stderr."),
    ] = False,
):
    """Read files, directories, globs or stdin as records.

    .txt/.md and files without an extension: one record per file {"id", "text", "metadata":
    {"path", "mtime", "bytes"}} (invalid UTF-8 is replaced and noted in `_warnings`; binary
    content is refused, one file's error under --on-error). .pdf: one record per page (id
    FILE:N, metadata.page, pages, title). .html: the main text without navigation, scripts
    and footers (metadata.title). .docx: text with headings as `#` lines. NAME.gz: read as NAME.
    .ndjson/.jsonl: records as they are (`content` is renamed `text`). .json: an array of
    objects or one object. .csv: one record per row, fields from the header. Records keep their
    own `id`; others get FILE, FILE:LINE or FILE:N, or a content hash with --id-by content.
    Directories are read recursively in sorted order; links leading out of the tree, hidden
    entries and unknown extensions are skipped and counted on stderr (--verbose names them).
    --watch emits {"id": FILE, "deleted": true} when a file it emitted is removed.

    \b
    Examples:
      sage source docs/ | sage chunk
      sage source 'notes/**/*.md' --id-by content
      sage source questions.txt -R
      tail -f log.txt | sage source -R -
      sage source --watch inbox/ | sage embed
      sage source papers/ --convert doc='antiword -' --verbose
    """
    import sys

    from sage_cli.operators.documents import parse_converters
    from sage_cli.operators.source import Source

    op = Source(
        paths,
        raw=raw,
        id_by=id_by,
        fmt=fmt,
        watch=watch,
        stdin=sys.stdin.buffer,
        convert=parse_converters(convert or []),
        verbose=verbose,
    )
    return op, op.records()
