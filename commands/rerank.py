"""sage rerank: reorder retrieved docs by relevance (phrase, sentence), diversity (mmr) or the
local model's judgement (llm)."""

from typing import Annotated

import typer

from sage_cli.cli.command import operator_command, single_command_app
from sage_cli.cli.options import QueryField, Threads

app = single_command_app()


@operator_command(app, "rerank")
def rerank(
    method: Annotated[
        str,
        typer.Option(
            "--method",
            metavar="phrase|sentence|mmr|llm",
            help="phrase: retrieval score + query word pairs found in "
            "the doc (relevance, no model); sentence: phrase + the query's best match among "
            "each doc's first 3 sentences, embedded (relevance); mmr: diversity on embeddings, "
            "not relevance; llm: the local model rates each doc 0-10 (slow; hurts with "
            "SmolLM2-135M).",
        ),
    ] = "sentence",
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
            "the query with its model) instead of re-embedding the docs; sentence: the "
            "index's own model, and the sentence vectors it keeps for the docs it holds "
            "(only the query is embedded: milliseconds instead of tenths of a second).",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            metavar="NAME|PATH",
            help="Model to embed with (sentence, mmr: default minilm-l6) or "
            "to judge with (llm, default smollm2-135m).",
            show_default=False,
        ),
    ] = None,
    field: QueryField = None,
    threads: Threads = None,
):
    """Reorder each record's `docs` (from `sage retrieve`).

    --method sentence (default) and phrase rank by relevance. phrase: each doc's retrieval
    `score`, scaled to 0..1 over the record's docs, plus 0.1 for every pair of adjacent query
    words found, in order, in the doc's title, heading or text (what BM25 and embeddings both
    miss); no model. sentence adds 1 x the best cosine between the query and one of each doc's
    first 3 sentences (embedded together with the embedding model: the index's own with
    --index, else --model, default minilm-l6): the one sentence that answers a question, which
    a whole chunk's vector blurs (the default `sage retrieve` already weighs first sentences;
    this adds all of each doc's first 3 to the word pairs). Measured on `retrieve -k 20`:
    recall@1 raised on most question sets, not all, recall@5 lowered on some; a few tenths of
    a second per query on 2 cores, far less with --index, whose stored sentence vectors it
    uses (docs/retrieval.md). --method phrase needs no model.

    --method mmr (maximal marginal relevance) is for diversity, not relevance: it lowers
    recall. It picks docs one by one, each maximising
    lambda * similarity to the query - (1 - lambda) * similarity to the docs already picked,
    so near-duplicates sink. Doc vectors come from a doc's `embedding`, from --index by id, or
    from the embedding model. --method llm asks the local generation model to rate each doc
    0-10 for the query (temperature 0: deterministic) and sorts by rating, ties in retrieved
    order; with the bundled SmolLM2-135M it lowers recall (the demo's recall@1 on the top 5,
    1.00 -> 0.50, at seconds per query): it is there for a stronger --model. Each doc's `score` becomes the reranker's, the old one is kept as
    `retrieval_score`; `rank` is renumbered. A record with empty `docs` passes through.

    \b
    Examples:
      sage retrieve --index idx/ -k 20 < q.ndjson | sage rerank -k 5
      sage retrieve --index idx/ -k 20 < q.ndjson | sage rerank --index idx/ -k 5
      sage retrieve --index idx/ -k 20 < q.ndjson | sage rerank --method phrase -k 5
      sage retrieve --index idx/ -k 10 < q.ndjson | sage rerank --method mmr --index idx/
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
