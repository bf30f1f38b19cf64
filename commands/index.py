"""sage index build|info: build and inspect vector indexes."""

from typing import Annotated

import typer

from sage_cli.cli.command import CONTEXT, operator_command
from sage_cli.cli.guard import guarded

app = typer.Typer(
    add_completion=False,
    rich_markup_mode=None,
    context_settings=CONTEXT,
    no_args_is_help=True,
    help="Build and inspect vector indexes (annoy + numpy vectors + BM25 + records).\n\n"
    "\b\nExamples:\n"
    "  sage source docs/ | sage chunk | sage embed | sage index build idx/\n"
    "  sage index info idx/",
)


@operator_command(app, "index build")
def build(
    directory: Annotated[
        str,
        typer.Argument(
            metavar="DIR",
            help="Index directory to write (replaced atomically if it is an index).",
            show_default=False,
        ),
    ],
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            metavar="NAME|PATH",
            help="Embedding model for records that come without "
            "an `embedding` (default: the model the other records name, else minilm-l6).",
            show_default=False,
        ),
    ] = None,
    trees: Annotated[
        int,
        typer.Option(
            "--trees", min=1, help="annoy trees: more is better recall and a bigger index."
        ),
    ] = 32,
    seed: Annotated[int, typer.Option("--seed", help="annoy build seed.")] = 42,
    update: Annotated[
        bool,
        typer.Option(
            "--update",
            help="Input is the full current listing: reuse the vectors DIR already holds for "
            "chunks whose id and text are unchanged, embed the rest; documents not in the "
            "input are gone.",
        ),
    ] = False,
    keep_missing: Annotated[
        bool,
        typer.Option(
            "--keep-missing",
            help="With --update: input holds only changed documents and deletion records "
            '({"id", "deleted": true}); documents it does not name are kept.',
        ),
    ] = False,
    sentences: Annotated[
        bool,
        typer.Option(
            "--sentences/--no-sentences",
            help="Also keep vectors of each chunk's first 3 sentences (sentences.npz), which "
            "the default `sage retrieve` ranks with; needs the model, even for records that "
            "come with their vectors.",
        ),
    ] = True,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            min=1,
            help="CPU threads for embedding (default: SAGE_THREADS or half the cores).",
            show_default=False,
        ),
    ] = None,
):
    """Build a vector index in DIR from records with `id`, `text` and `embedding`.

    Writes annoy (angular) + the vectors (vectors.npy, float32) + the records without their
    embeddings (records.ndjson) + BM25 statistics + manifest.json (model name and sha256,
    dimension, metric, count, build parameters, created). Everything is written to a temporary
    directory beside DIR and renamed into place: readers see the old index or the new one,
    never half of one; a failed build leaves the old index alone. A non-empty DIR that is not
    an index is never replaced. With the records' model at hand (found by name, same
    sha256), the first 3 sentences of every chunk are embedded too (sentences.npz, used by
    the default `sage retrieve`; --no-sentences skips them, as does a model not found here).

    Records take their vector from `embedding` (floats, or base64 float32) or `embedding_b64`
    and their model from `embedding_model`; a record without a vector is embedded here with
    --model. Vectors from two models, or two dimensions, are refused (exit 65, naming the
    record); ids must be unique. Output: one summary record (index, count, dimension, model,
    sentence_vectors).
    No input records: nothing is written, no output.

    --update rebuilds DIR from the input, taking the vector of every chunk whose id and text
    (and model) are unchanged from DIR instead of embedding it again: documents changed are
    replaced, new ones added, those missing from the input removed. With --keep-missing the
    input is only what changed: documents (a chunk's `parent_id`, else its `id`) it names are
    replaced, deletion records `{"id": ID, "deleted": true, "metadata": {"path": P}}` (what
    `sage source --watch` emits for a removed file) remove the document ID and every chunk
    from path P, the rest is kept. The summary adds embedded, reused and removed counts.

    \b
    Examples:
      sage source docs/ | sage chunk | sage embed | sage index build idx/
      sage chunk docs.ndjson | sage index build idx/ --model minilm-l6
      sage index build idx/ --trees 50 embedded.ndjson
      sage source docs/ | sage chunk | sage index build idx/ --update
      sage chunk changes.ndjson | sage index build idx/ --update --keep-missing
    """
    from sage_cli.operators.index import IndexBuilder
    from sage_cli.resources import default_threads, hash_cache_file, model_dirs

    return IndexBuilder(
        directory,
        model=model,
        model_dirs=model_dirs(),
        threads=threads or default_threads(),
        trees=trees,
        seed=seed,
        hash_cache=hash_cache_file(),
        update=update,
        keep_missing=keep_missing,
        sentences=sentences,
    )


# registered as "index build" so messages say `sage index build: ...`; listed as `build`
app.registered_commands[-1].name = "build"


@app.command("info")
def info(
    directory: Annotated[
        str, typer.Argument(metavar="DIR", help="Index directory.", show_default=False)
    ],
    as_json: Annotated[
        bool, typer.Option("--json", help="JSON even on a terminal (it is the default when piped).")
    ] = False,
):
    """Print the manifest of the index in DIR: JSON when piped, a table on a terminal.

    A missing, foreign or corrupt index is exit 69 with the fix.

    \b
    Examples:
      sage index info idx/
      sage index info idx/ | jq .count
    """
    import sys

    def body() -> None:
        from sage_cli.operators.index import read_manifest

        manifest = read_manifest(directory)
        manifest["directory"] = directory
        if as_json or not sys.stdout.isatty():
            import orjson

            sys.stdout.buffer.write(orjson.dumps(manifest, option=orjson.OPT_APPEND_NEWLINE))
            sys.stdout.flush()
            return

        def rows(prefix: str, value: object) -> list[tuple[str, object]]:
            if isinstance(value, dict):
                return [row for k, v in value.items() for row in rows(f"{prefix}{k}.", v)]
            return [] if value is None else [(prefix.rstrip("."), value)]

        table = rows("", manifest)
        width = max(len(key) for key, _ in table)
        for key, value in table:
            sys.stdout.write(f"{key:{width}s}  {value}\n")
        sys.stdout.flush()

    code = guarded("sage index info", body)
    raise typer.Exit(code)
