"""sage rerank: reorder retrieved docs by MMR or by the local model's judgement."""

from typing import Annotated

import typer

from sage_cli.command import operator_command, single_command_app
from sage_cli.options import QueryField, Threads

app = single_command_app()


@operator_command(app, "rerank")
def rerank(
    method: Annotated[
        str,
        typer.Option(
            "--method",
            metavar="mmr|llm",
            help="mmr: relevance traded against diversity on "
            "embeddings; llm: the local model rates each doc 0-10.",
        ),
    ] = "mmr",
    lam: Annotated[
        float,
        typer.Option(
            "--lambda", min=0.0, max=1.0, help="MMR: 1 = relevance only, 0 = diversity only."
        ),
    ] = 0.5,
    k: Annotated[
        int | None,
        typer.Option(
            "-k", "--top-k", min=1, help="Keep the first k docs (default: all).", show_default=False
        ),
    ] = None,
    index: Annotated[
        str | None,
        typer.Option(
            "--index",
            metavar="DIR",
            help="MMR: take doc vectors from this index by id (and embed "
            "the query with its model) instead of re-embedding the docs.",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            metavar="NAME|PATH",
            help="Model to embed with (mmr, default minilm-l6) or "
            "to judge with (llm, default smollm2-135m).",
            show_default=False,
        ),
    ] = None,
    field: QueryField = None,
    threads: Threads = None,
):
    """Reorder each record's `docs` (from `sage retrieve`).

    --method mmr (maximal marginal relevance) picks docs one by one, each maximising
    lambda * similarity to the query - (1 - lambda) * similarity to the docs already picked,
    so near-duplicates sink. Doc vectors come from a doc's `embedding`, from --index by id, or
    from the embedding model. --method llm asks the local generation model to rate each doc
    0-10 for the query (temperature 0: deterministic) and sorts by rating, ties in retrieved
    order. Each doc's `score` becomes the reranker's, the old one is kept as
    `retrieval_score`; `rank` is renumbered. A record with empty `docs` passes through.

    \b
    Examples:
      sage retrieve --index idx/ -k 20 < q.ndjson | sage rerank --index idx/ -k 5
      sage retrieve --index idx/ -k 10 < q.ndjson | sage rerank --method mmr --lambda 0.7
      sage retrieve --index idx/ -k 8 < q.ndjson | sage rerank --method llm -k 3
    """
    from sage_cli.operators.rerank import Reranker
    from sage_cli.resources import default_threads, hash_cache_file, model_dirs

    return Reranker(
        method,
        lam=lam,
        k=k,
        index=index,
        model=model,
        field=field,
        model_dirs=model_dirs(),
        threads=threads or default_threads(),
        hash_cache=hash_cache_file(),
    )
