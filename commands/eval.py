"""sage eval: score answers against `gold` and the retrieved `docs`, docs against `gold_ids`."""

from typing import Annotated

import typer

from sage_cli.cli.command import operator_command, single_command_app

app = single_command_app()


@operator_command(app, "eval")
def eval_records(
    k: Annotated[
        int, typer.Option("-k", "--k", min=1, help="Cut-off for recall@k and nDCG@k (and MRR).")
    ] = 5,
    summary: Annotated[
        bool,
        typer.Option(
            "--summary/--no-summary", help="Write a summary record (id `_summary`) at the end."
        ),
    ] = True,
):
    """Score each record and add an `eval` object; write a summary record at the end.

    With `gold` (a string or a list): exact_match, f1 (token F1) and contains, the best over
    the golds, after SQuAD normalisation (lowercase, no punctuation, no a/an/the). With
    `answer` and `docs`: groundedness, the share of the answer's content words (no stop
    words, no [n] citation markers) found in the docs' text; no gold needed. With
    `gold_ids`: recall@k, mrr and ndcg@k of the ids of `docs` (a chunk `doc#2` or a hit with
    `parent_id` "doc" counts for "doc"). The last record is
    {"id": "_summary", "_summary": true, "count": N, "eval": {metric: mean}}; on a terminal a
    table of the means is also shown on stderr.

    \b
    Examples:
      sage eval answers.ndjson | sage filter 'r["eval"].get("f1", 1) < 0.5'
      sage retrieve --index idx/ -k 10 < questions.ndjson | sage eval -k 10 | tail -1
      echo '{"answer": "Paris.", "gold": ["Paris", "paris, france"]}' | sage eval
    """
    from sage_cli.operators.eval import Eval

    return Eval(k=k, summary=summary)
