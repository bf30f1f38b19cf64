"""`sage rerank --method sentence`: phrase score + 2 * the best query-sentence cosine of each
doc's first three sentences, with a fake embedder (the real model: tests/commands)."""

import numpy as np
import pytest

from sage_cli.operators.base import RecordError
from sage_cli.operators.chunk import sentences
from sage_cli.operators.rerank import (
    PHRASE_WEIGHT,
    SENTENCE_WEIGHT,
    Reranker,
    sentence_order,
    word_pairs,
)
from tests.operators.test_index import FakeEmbedder


def test_sentences_split_like_chunk_by_sentences():
    text = "Return the time. It is e.g. a float!\n\nBlank lines end one too\n\n  "
    assert sentences(text) == ["Return the time.", "It is e.g. a float!", "Blank lines end one too"]
    assert sentences("") == [] and sentences("no end") == ["no end"]


def test_one_matching_sentence_lifts_its_doc_over_a_better_retrieved_one():
    fake = FakeEmbedder()
    docs = [
        {"id": "clock", "text": "Return the clock time. Fractions may appear.", "score": 0.9},
        {"id": "sleep", "text": "Something else entirely. Pause for some seconds.", "score": 0.88},
        {"id": "other", "text": "Unrelated words here.", "score": 0.1},
    ]
    op = Reranker("sentence", k=2, model=__file__, embedder_factory=lambda p, t: fake)
    [out] = op.run([{"query": "pause for some seconds", "docs": docs}])
    assert [d["id"] for d in out["docs"]] == ["sleep", "clock"]
    # one call: the query, then each distinct sentence of each doc, in order
    assert fake.calls == [
        [
            "pause for some seconds",
            "Return the clock time.",
            "Fractions may appear.",
            "Something else entirely.",
            "Pause for some seconds.",
            "Unrelated words here.",
        ]
    ]
    # the phrase score (scaled retrieval score 0.975 + 0.1 per query word pair in the doc)
    # + 2 * the cosine of its best sentence
    vectors = fake.embed(["pause for some seconds", "Pause for some seconds."])
    pairs = len(word_pairs("pause for some seconds") & word_pairs(docs[1]["text"]))
    assert pairs == 2  # "for some" is two stop words
    expected = 0.975 + PHRASE_WEIGHT * pairs + SENTENCE_WEIGHT * float(vectors[1] @ vectors[0])
    assert out["docs"][0]["score"] == round(expected, 6)
    assert out["docs"][0]["retrieval_score"] == 0.88 and out["docs"][0]["rank"] == 1


def test_only_the_first_three_sentences_count_and_repeats_are_embedded_once():
    calls = []

    def embed(texts):
        calls.append(list(texts))
        out = np.zeros((len(texts), 2), dtype=np.float32)
        for i, t in enumerate(texts):
            out[i] = [1.0, 0.0] if t.startswith(("q", "Match")) else [0.0, 1.0]
        return out

    docs = [
        {"id": "a", "text": "One. Two. Three. Match four.", "score": 1.0},
        {"id": "b", "text": "One. Match.", "score": 0.4},
        {"id": "c", "text": "Zero.", "score": 0.0},
    ]
    order = sentence_order("q", docs, embed, 2)
    assert [i for i, _ in order] == [1, 0]  # a's match is its fourth sentence: not read
    assert calls == [["q", "One.", "Two.", "Three.", "Match.", "Zero."]]
    assert order[0][1] == pytest.approx(0.4 + SENTENCE_WEIGHT * 1.0)
    assert order[1][1] == pytest.approx(1.0 + SENTENCE_WEIGHT * 0.0)


def test_sentence_keeps_phrase_pairs_and_needs_doc_text():
    fake = FakeEmbedder()
    op = Reranker("sentence", model=__file__, embedder_factory=lambda p, t: fake)
    with pytest.raises(RecordError, match="doc 1 has no `text`"):
        op.run([{"query": "q", "docs": [{"id": 1}]}])
    assert fake.calls == []  # refused before any model call
    docs = [{"id": "x", "text": "zz yy", "score": 1.0}, {"id": "y", "text": "zz yy", "score": 1.0}]
    [out] = op.run([{"query": "null operation", "docs": docs}])
    assert [d["id"] for d in out["docs"]] == ["x", "y"]  # a tie keeps the retrieved order
