"""sage retrieve: attach the indexed documents most relevant to each query."""

from typing import Annotated

import typer

from sage_cli.cli.command import operator_command, single_command_app
from sage_cli.cli.options import QueryField, Threads

app = single_command_app()


@operator_command(app, "retrieve")
def retrieve(
    index: Annotated[
        str,
        typer.Option(
            "--index", metavar="DIR", help="Index built by `sage index build`.", show_default=False
        ),
    ],
    k: Annotated[int, typer.Option("-k", "--top-k", min=1, help="Documents per query.")] = 5,
    mode: Annotated[
        str,
        typer.Option(
            "--mode",
            metavar="hybrid|dense|bm25",
            help="hybrid: embeddings and BM25 fused (see --fusion; the best "
            "measured, docs/retrieval.md); dense: embeddings only (annoy); bm25: words only, "
            "no model.",
        ),
    ] = "hybrid",
    fusion: Annotated[
        str,
        typer.Option(
            "--fusion",
            metavar="adaptive|relative|rrf",
            help="hybrid: fuse min-max normalised scores, (1 - w) * dense + w * bm25, with "
            "BM25's weight w = (1 - alpha) * the query's lexical strength (adaptive), or the "
            "fixed w = 1 - alpha (relative); or reciprocal ranks (sum of 1 / (60 + rank)).",
        ),
    ] = "adaptive",
    alpha: Annotated[
        float,
        typer.Option(
            "--alpha",
            min=0.0,
            max=1.0,
            help="hybrid: the weight of the dense scores (adaptive: when the query's words "
            "match the corpus fully; dense gets more as the match weakens).",
        ),
    ] = 0.5,
    sentence_weight: Annotated[
        float,
        typer.Option(
            "--sentence-weight",
            min=0.0,
            max=10.0,
            help="hybrid: a candidate's dense score is its cosine + this x the best cosine of "
            "one of its first 3 sentences (when the index has sentence vectors); 0: chunk "
            "vectors alone.",
        ),
    ] = 0.5,
    exact: Annotated[
        bool, typer.Option("--exact", help="Exact numpy search over every vector instead of annoy.")
    ] = False,
    search_k: Annotated[
        int | None,
        typer.Option(
            "--search-k",
            min=1,
            help="annoy nodes to inspect (default: enough for recall@10 >= "
            "0.95 against exact search).",
            show_default=False,
        ),
    ] = None,
    min_score: Annotated[
        float | None,
        typer.Option(
            "--min-score",
            help="Drop hits scoring below this (fused score for hybrid, 0..1; cosine "
            "for dense; BM25 score).",
            show_default=False,
        ),
    ] = None,
    field: QueryField = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            metavar="NAME|PATH",
            help="Embedding model file, when the index's own is "
            "not found by name; its sha256 must still match the index.",
            show_default=False,
        ),
    ] = None,
    threads: Threads = None,
):
    """Attach `docs`, the indexed documents most relevant to each record's `query`.

    By default (--mode hybrid) the embedding and BM25 rankings of the indexed text (top 50
    each) are fused by relative score: each list's scores scaled to 0..1, then
    (1 - w) * dense + w * bm25, where BM25's weight w = 0.5 * the query's lexical strength
    (--fusion adaptive, --alpha 0.5). Lexical strength (0..1) is the mean of two signals
    about BM25's top hit, each clipped to 0..1: its score as a share of the most any
    document could score for the query (0 at 0.1, 1 at 0.2), and the share of the IDF of
    the query's content words it contains (1 at 0.8). A query in the corpus's own words gets
    equal weights; one whose words the corpus lacks is ranked by its embedding alone (why:
    docs/retrieval.md, "Retrieval quality"). Before fusion, when the index holds sentence
    vectors (built with its model at hand), each candidate's dense score becomes its cosine
    + 0.5 x the best cosine of one of its first 3 sentences (--sentence-weight); --mode dense
    is chunk vectors alone. The query is embedded with
    the index's own model (its sha256 must match the manifest: a different model is exit 69)
    unless the record already carries an `embedding`; --mode bm25 loads no model. Each hit is
    the indexed record (id, text, metadata, parent_id ...) with `score`, `rank` (from 1) and
    `query_id`. annoy's search_k defaults to max(1000, 16 sqrt(N), 8 k trees), measured to keep
    recall@10 against --exact at or above 0.95. An empty query is that record's error (exit 65);
    a missing, foreign or corrupt index is exit 69.

    \b
    Examples:
      sage source questions.txt -R | sage retrieve --index idx/ -k 5
      echo '{"query": "how do I open a file?"}' | sage retrieve --index idx/ --mode dense
      sage retrieve --index idx/ --mode bm25 --min-score 2 queries.ndjson
    """
    from sage_cli.operators.retrieve import Retriever
    from sage_cli.resources import default_threads, hash_cache_file, model_dirs

    return Retriever(
        index,
        k=k,
        mode=mode,
        fusion=fusion,
        alpha=alpha,
        sentence_weight=sentence_weight,
        exact=exact,
        search_k=search_k,
        min_score=min_score,
        field=field,
        model=model,
        model_dirs=model_dirs(),
        threads=threads or default_threads(),
        hash_cache=hash_cache_file(),
    )
