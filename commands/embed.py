"""sage embed: add a sentence embedding to each record with a local model."""

from enum import StrEnum
from typing import Annotated

import typer

from sage_cli.cli.command import operator_command, single_command_app
from sage_cli.cli.options import Threads

app = single_command_app()


class Format(StrEnum):
    floats = "floats"
    b64 = "b64"


@operator_command(app, "embed")
def embed_records(
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            metavar="NAME|PATH",
            help="Embedding model: a name from `sage models list` or a .gguf path.",
        ),
    ] = "minilm-l6",
    field: Annotated[
        str,
        typer.Option(
            "--field",
            "-f",
            metavar="FIELD",
            help="Field holding the text to embed (`text` also accepts `content`).",
        ),
    ] = "text",
    fmt: Annotated[
        Format,
        typer.Option(
            "--format",
            help="floats: `embedding` as a list of numbers; b64: "
            "`embedding_b64`, base64 of little-endian float32 (smaller, exact).",
            case_sensitive=False,
        ),
    ] = Format.floats,
    threads: Threads = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Neither read nor write the embedding cache.")
    ] = False,
):
    """Add an `embedding` (unit length) of each record's text, with `embedding_model`.

    The model (all-MiniLM-L6-v2 by default, 384 dims) loads once; records are embedded in
    batches (--batch-size, default 64). Texts longer than the model's 256-token window are
    truncated. `embedding_model` ({name, sha256}) lets `sage index build` refuse mixed models.
    Embeddings are cached in $SAGE_CACHE_DIR (default ~/.cache/sage) by model hash and text,
    so a re-run embeds only new or changed texts; on a terminal (or with --progress) a last
    line says how many came from the cache. A record without the field is that record's
    error (see --on-error). A missing or corrupt model is exit 69.

    \b
    Examples:
      sage source docs/ | sage chunk | sage embed > chunks.ndjson
      sage embed --field title --format b64 < papers.ndjson
      echo '{"text": "The cat sits on the mat"}' | sage embed | jq '.embedding | length'
    """
    from sage_cli.operators.embed import Embed
    from sage_cli.resources import cache_dir, default_threads, hash_cache_file, model_dirs

    return Embed(
        model,
        model_dirs=model_dirs(),
        field=field,
        fmt=fmt.value,
        threads=threads or default_threads(),
        cache_path=None if no_cache else cache_dir() / "embed.sqlite",
        hash_cache=hash_cache_file(),
    )
