"""`sage rerank --method llm` judges a record's documents with the batched decoder (issue 15):
the same scores, so the same order, as one model call per document, with the real SmolLM2."""

from __future__ import annotations

import pytest

from sage_cli.operators.rerank import Reranker

pytestmark = pytest.mark.model

DOCS = [
    "Paris is the capital and largest city of France.",
    "Python lists are mutable sequences that hold items in order.",
    "Berlin is the capital of Germany.",
    "France borders Spain, Italy, Germany, Belgium and Switzerland.",
]


def test_batched_judge_gives_the_scores_and_order_of_one_call_per_document():
    record = {
        "query": "What is the capital of France?",
        "docs": [{"id": str(i), "text": t, "score": 0.5} for i, t in enumerate(DOCS)],
    }
    got = {}
    for batched in (False, True):
        op = Reranker("llm", batched=batched, threads=2)
        op.setup()
        try:
            [out] = op.process([record])
            if batched:
                assert op._judge.decoder is not None  # the batched decoder did the judging
                assert op._judge.decoder.steps >= 1
        finally:
            op.close()
        got[batched] = [(d["id"], round(d["score"], 4)) for d in out["docs"]]
    assert got[True] == got[False]
