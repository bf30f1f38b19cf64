"""sage chunk: split documents into overlapping chunks."""

from typing import Annotated

import typer

from sage_cli.cli.command import operator_command, single_command_app

app = single_command_app()


@operator_command(app, "chunk")
def chunk(
    by: Annotated[
        str,
        typer.Option(
            "--by",
            metavar="chars|tokens|sentences|paragraphs",
            help="Unit that --size and --overlap count.",
        ),
    ] = "chars",
    size: Annotated[
        int | None,
        typer.Option(
            "--size",
            min=1,
            help="Largest chunk, in --by units (default: chars 800, tokens 200, "
            "sentences 5, paragraphs 2).",
            show_default=False,
        ),
    ] = None,
    overlap: Annotated[
        int | None,
        typer.Option(
            "--overlap",
            min=0,
            help="How much of the previous chunk a chunk may repeat, in --by "
            "units (default: chars 100, tokens 25, sentences 1, paragraphs 0).",
            show_default=False,
        ),
    ] = None,
):
    """Split each record's `text` (or `content`) into overlapping chunks.

    Chunks get ids `<doc id>#<n>` (n from 0) and `parent_id`; every other field is copied.
    A chunk never ends inside a word; a single word longer than --size is a chunk of its own.
    Markdown headings start a new chunk and their path is kept as `metadata.heading`
    ("Guide > Install"); `metadata` also gets `chunk`, `start`, `end` (offsets in the document).
    Tokens are counted without a model: a run of letters/digits or one punctuation mark is one
    token. Blank documents give no chunks.

    \b
    Examples:
      sage source docs/ | sage chunk | sage embed | sage index build idx/
      sage chunk --by tokens --size 200 --overlap 25 docs.ndjson
      sage chunk --by sentences --size 3 --overlap 1 < docs.ndjson
    """
    from sage_cli.operators.chunk import Chunker

    return Chunker(by, size, overlap)
