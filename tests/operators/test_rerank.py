"""Reranking with hand-made vectors and a fake judge (the real models: tests/commands)."""

import numpy as np
import pytest

from sage_cli.operators.base import OptionError, RecordError
from sage_cli.operators.index import ModelRef, write_index
from sage_cli.operators.rerank import Reranker, mmr_order, word_pairs
from tests.operators.test_index import FakeEmbedder


def vec(*xs):
    v = np.array(xs, dtype=np.float32)
    return (v / np.linalg.norm(v)).tolist()


def test_mmr_order_pushes_near_duplicates_down():
    q = np.array([1.0, 0.0, 0.0], dtype=np.float32)
    docs = np.array([vec(0.9, 0.1, 0), vec(0.9, 0.11, 0), vec(0.7, 0, 0.7)], dtype=np.float32)
    assert [i for i, _ in mmr_order(q, docs, 1.0, 3)] == [0, 1, 2]  # pure relevance
    assert [i for i, _ in mmr_order(q, docs, 0.5, 3)] == [0, 2, 1]  # the duplicate sinks
    assert len(mmr_order(q, docs, 0.5, 2)) == 2


def record():
    return {
        "id": "q",
        "query": "anything",
        "embedding": vec(1, 0, 0),
        "docs": [
            {"id": "a", "text": "A", "score": 0.9, "rank": 1, "embedding": vec(0.9, 0.1, 0)},
            {"id": "b", "text": "B", "score": 0.8, "rank": 2, "embedding": vec(0.9, 0.11, 0)},
            {"id": "c", "text": "C", "score": 0.5, "rank": 3, "embedding": vec(0.7, 0, 0.7)},
        ],
    }


def test_mmr_with_doc_embeddings_needs_no_model():
    def no_model(p, t):
        raise AssertionError("no model needed")

    [out] = Reranker("mmr", lam=0.5, k=2, embedder_factory=no_model).run([record()])
    assert [d["id"] for d in out["docs"]] == ["a", "c"]
    assert [d["rank"] for d in out["docs"]] == [1, 2]
    assert out["docs"][1]["retrieval_score"] == 0.5 and out["docs"][1]["score"] != 0.5


def test_mmr_takes_vectors_from_the_index_by_id(tmp_path):
    fake = FakeEmbedder()
    texts = ["red apple pie", "red apple pie recipe", "green garden salad"]
    write_index(
        tmp_path / "ix",
        fake.embed(texts),
        [{"id": f"t{i}", "text": t} for i, t in enumerate(texts)],
        ModelRef("fake", "f" * 64),
        trees=2,
    )
    fake.calls.clear()
    docs = [{"id": f"t{i}", "text": t, "score": 1 - i / 10} for i, t in enumerate(texts)]
    op = Reranker(
        "mmr", lam=0.3, index=tmp_path / "ix", model=__file__, embedder_factory=lambda p, t: fake
    )
    [out] = op.run([{"query": "apple pie", "docs": docs}])
    assert fake.calls == [["apple pie"]]  # only the query was embedded
    assert [d["id"] for d in out["docs"]][:2] == ["t0", "t2"]


def test_mmr_embeds_docs_without_vectors():
    fake = FakeEmbedder()
    docs = [{"id": "x", "text": "blue sky"}, {"id": "y", "text": "apple pie"}]
    op = Reranker("mmr", lam=1.0, model=__file__, embedder_factory=lambda p, t: fake)
    [out] = op.run([{"query": "apple pie", "docs": docs}])
    assert fake.calls == [["blue sky", "apple pie", "apple pie"]]
    assert [d["id"] for d in out["docs"]] == ["y", "x"]


class FakeJudge:
    def score(self, query, text):
        return 10.0 if query.split()[0] in text else 1.0


def test_llm_method_sorts_by_judgement_keeping_ties_in_order():
    docs = [
        {"id": i, "text": t, "score": 1.0}
        for i, t in enumerate(["nothing here", "cats everywhere", "no match", "cats again"])
    ]
    op = Reranker("llm", k=3, model=__file__, judge_factory=lambda p, t: FakeJudge())
    [out] = op.run([{"query": "cats please", "docs": docs}])
    assert [d["id"] for d in out["docs"]] == [1, 3, 0]
    assert [d["score"] for d in out["docs"]] == [10.0, 10.0, 1.0]


def test_empty_docs_pass_through_and_bad_records():
    rec = {"query": "q", "docs": [], "x": 1}
    assert Reranker("phrase").run([rec]) == [rec]
    with pytest.raises(RecordError, match="'docs'"):
        Reranker("phrase").run([{"query": "q"}])
    with pytest.raises(RecordError, match="list of objects"):
        Reranker("phrase").run([{"query": "q", "docs": ["a"]}])
    with pytest.raises(RecordError, match="empty query"):
        Reranker("phrase").run([{"query": " ", "docs": [{"text": "a"}]}])


@pytest.mark.parametrize("kwargs", [{"method": "bogus"}, {"lam": 1.5}, {"k": 0}])
def test_bad_options(kwargs):
    with pytest.raises(OptionError):
        Reranker(**kwargs)


def test_phrase_scales_scores_and_adds_query_word_pairs():
    docs = [
        {"id": "a", "text": "nothing in common", "score": 2.2},
        {"id": "b", "text": "a null operation: nothing happens", "score": 2.0},
        {"id": "c", "text": "null values", "score": 1.0},
    ]
    [out] = Reranker("phrase").run(
        [{"query": "Which statement is a null operation?", "docs": docs}]
    )
    # scaled 1, 1/1.2, 0; b holds "a null" and "null operation" (+0.2); "is a" is two stop words
    assert [d["id"] for d in out["docs"]] == ["b", "a", "c"]
    assert [d["score"] for d in out["docs"]] == [round(1 / 1.2 + 0.2, 6), 1.0, 0.0]
    assert [d["retrieval_score"] for d in out["docs"]] == [2.0, 2.2, 1.0]
    assert [d["rank"] for d in out["docs"]] == [1, 2, 3]


def test_phrase_reads_the_title_and_uses_the_order_when_scores_are_missing():
    docs = [
        {"id": "x", "text": "first"},
        {"id": "y", "text": "second", "metadata": {"title": "textwrap.dedent: leading whitespace"}},
        {"id": "z", "text": "third"},
    ]
    [out] = Reranker("phrase", k=2).run([{"query": "remove leading whitespace", "docs": docs}])
    # no scores: 1, 0.5, 0 by position; y's title holds "leading whitespace"
    assert [(d["id"], d["score"]) for d in out["docs"]] == [("x", 1.0), ("y", 0.6)]
    assert word_pairs("Is it a cat?") == {("a", "cat")}


def test_phrase_needs_doc_text():
    with pytest.raises(RecordError, match="doc 1 has no `text`"):
        Reranker("phrase").run([{"query": "q", "docs": [{"id": 1}]}])
