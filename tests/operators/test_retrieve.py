"""Fusion of the dense and BM25 rankings, hand-computed."""

import math

import numpy as np
import pytest

from sage_cli.operators.base import OptionError
from sage_cli.operators.index import ModelRef, write_index
from sage_cli.operators.retrieve import (
    COVERAGE_FULL,
    DEFAULT_FUSION,
    DEFAULT_MODE,
    Retriever,
    adaptive_weights,
    lexical_strength,
    relative_fusion,
    rrf,
)


def test_relative_fusion_scales_each_list_to_0_1_and_weights_them():
    dense = [(0, 1.0), (1, 0.75), (2, 0.5)]  # scaled 1, 0.5, 0
    bm25 = [(2, 12.0), (3, 4.0)]  # scaled 1, 0
    fused = relative_fusion([dense, bm25], [0.5, 0.5], 10)
    assert fused == [(0, 0.5), (2, 0.5), (1, 0.25), (3, 0.0)]  # ties by the lower row
    assert relative_fusion([dense, bm25], [0.75, 0.25], 2) == [(0, 0.75), (1, 0.375)]
    # an empty list (no query word in the index) adds nothing; one hit scales to 1
    assert relative_fusion([[(5, 0.3)], []], [0.5, 0.5], 3) == [(5, 0.5)]


def test_rrf_is_kept_as_the_other_fusion():
    assert rrf([[0, 1], [1, 2]], 3) == [(1, 1 / 62 + 1 / 61), (0, 1 / 61), (2, 1 / 62)]


def test_hybrid_relative_fusion_of_a_query_in_the_corpus_words(tmp_path):
    assert DEFAULT_MODE == "hybrid"
    texts = ["red apple pie", "green garden salad", "apple tart", "stock markets"]
    rows = np.array([[1, 0, 0], [0.8, 0.6, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    write_index(
        tmp_path / "ix",
        rows,
        [{"id": f"t{i}", "text": t} for i, t in enumerate(texts)],
        ModelRef("m"),
        trees=2,
    )
    op = Retriever(tmp_path / "ix", k=3)
    [out] = op.run([{"query": "apple", "embedding": [1.0, 0.0, 0.0]}])
    # dense: t0 1, t1 0.8, t2 0, t3 0 -> scaled 1, 0.8, 0, 0; bm25: t2 (shorter), t0 -> 1, 0
    assert [(d["id"], d["score"]) for d in out["docs"]] == [("t0", 0.5), ("t2", 0.5), ("t1", 0.4)]
    [rrf_out] = Retriever(tmp_path / "ix", k=3, fusion="rrf").run(
        [{"query": "apple", "embedding": [1.0, 0.0, 0.0]}]
    )
    assert rrf_out["docs"][0]["score"] == round(1 / 61 + 1 / 62, 6)


@pytest.mark.parametrize("kwargs", [{"fusion": "max"}, {"alpha": 1.5}, {"mode": "sparse"}])
def test_bad_fusion_options(tmp_path, kwargs):
    with pytest.raises(OptionError):
        Retriever(tmp_path, **kwargs)


def test_bm25_max_score_and_idf_coverage_by_hand():
    from sage_cli.operators.bm25 import BM25

    bm = BM25.build(["red apple", "green pear", "apple pie recipe", "blue sky"])
    idf_apple, idf_red, idf_unknown = math.log(2), math.log(1 + 3.5 / 1.5), math.log(10)
    # distinct terms the corpus holds, each idf * (k1 + 1); "banana" is not in the corpus
    assert bm.max_score("apple apple banana red") == pytest.approx((idf_apple + idf_red) * 2.2)
    assert bm.max_score("banana") == 0.0
    # doc 0 holds apple and red, not banana (counted with the highest idf, df 0)
    total = idf_apple + idf_red + idf_unknown
    assert bm.idf_coverage(["apple", "red", "banana"], 0) == pytest.approx(
        (idf_apple + idf_red) / total
    )
    assert bm.idf_coverage(["apple", "red", "banana"], 2) == pytest.approx(idf_apple / total)
    assert bm.idf_coverage(["sky"], 0) == 0.0
    assert bm.idf_coverage([], 0) == 0.0


def test_lexical_strength_is_the_mean_of_score_share_and_idf_coverage():
    from sage_cli.operators.bm25 import BM25

    bm = BM25.build(["red apple", "green pear", "apple pie recipe", "blue sky"])
    # "apple banana": BM25's top hit is "red apple" (the shorter); its score is
    # idf * 2.2 / (1 + norm) with norm = 1.2 * (0.25 + 0.75 * 2 / 2.25) = 1.1, a share of
    # 1 / 2.1 = 0.48 of the most possible (apple's idf * 2.2): over 0.2, so that signal is 1.
    # "how" is a stop word; apple (df 2) is covered, banana (unknown) is not.
    hits = bm.search("how apple banana", 5)
    assert hits[0][0] == 0
    assert hits[0][1] / bm.max_score("apple") == pytest.approx(1 / 2.1, rel=1e-5)
    coverage = math.log(2) / (math.log(2) + math.log(10))
    expected = (1.0 + coverage / COVERAGE_FULL) / 2
    assert lexical_strength(bm, "how apple banana", hits) == pytest.approx(expected, rel=1e-5)
    # every content word in the top hit: both signals at 1
    assert lexical_strength(bm, "red apple", bm.search("red apple", 5)) == 1.0
    # nothing found: 0, whatever the query
    assert lexical_strength(bm, "banana", bm.search("banana", 5)) == 0.0
    assert adaptive_weights(0.5, 1.0) == (0.5, 0.5)
    assert adaptive_weights(0.5, 0.0) == (1.0, 0.0)
    assert adaptive_weights(0.2, 0.5) == pytest.approx((0.6, 0.4))


def _pause_index(tmp_path):
    """Six documents; the query's right answer (t0) shares no content word with it."""
    texts = [
        "sleep suspends execution of the calling thread for a number of seconds",
        "exit the interpreter with a status code when a program ends early",
        "stock markets fall and rise with every news item",
        "green garden salad with olive oil",
        "apple tart with cream",
        "open a file and return a file object",
    ]
    rows = np.zeros((6, 3), dtype=np.float32)
    rows[0] = [1, 0, 0]
    rows[1] = [0.28, 0.96, 0]  # unit length: cosine 0.28
    rows[2:] = [0, 0, 1]
    records = [{"id": f"t{i}", "text": t} for i, t in enumerate(texts)]
    write_index(tmp_path / "ix", rows, records, ModelRef("m"), trees=2)
    return tmp_path / "ix"


def test_adaptive_fusion_is_the_default_and_trusts_dense_when_the_words_do_not_match(tmp_path):
    """The held-out-2 failure in small: BM25's only hit (t1) matches just "program" (not
    "pause"), dense ranks the right answer (t0) first. Fixed equal weights let BM25's
    weak list win; adaptive fusion weights it by the query's lexical strength."""
    from sage_cli.operators.bm25 import BM25

    ix = _pause_index(tmp_path)
    query = {"query": "how do I pause my program", "embedding": [1.0, 0.0, 0.0]}
    assert Retriever(ix).fusion == DEFAULT_FUSION == "adaptive"
    [fixed] = Retriever(ix, k=2, fusion="relative").run([dict(query)])
    assert fixed["docs"][0]["id"] == "t1"
    [out] = Retriever(ix, k=2).run([dict(query)])
    assert [d["id"] for d in out["docs"]] == ["t0", "t1"]
    # the fused scores are (1 - w) * dense + w * bm25 with w = 0.5 * lexical strength
    bm = BM25.load(ix / "bm25.npz")
    hits = bm.search(query["query"], 50)
    assert [r for r, _ in hits] == [1]
    w = 0.5 * lexical_strength(bm, query["query"], hits)
    assert 0 < w < 0.5
    # dense cosines 1, 0.28, 0 (x4), min-max scaled the same; BM25: t1 alone, scaled 1
    assert out["docs"][0]["score"] == pytest.approx(1 - w, abs=1e-6)
    assert out["docs"][1]["score"] == pytest.approx((1 - w) * 0.28 + w, abs=1e-6)
    # --alpha 1: dense alone, whatever the fusion; the BM25-only hits are not candidates
    [dense_only] = Retriever(ix, k=6, alpha=1.0).run([dict(query)])
    assert [d["id"] for d in dense_only["docs"]] == ["t0", "t1", "t2", "t3", "t4", "t5"]


def test_adaptive_fusion_keeps_equal_weights_for_a_query_in_the_corpus_words(tmp_path):
    ix = _pause_index(tmp_path)
    query = {"query": "exit with a status code", "embedding": [1.0, 0.0, 0.0]}
    [fixed] = Retriever(ix, k=3, fusion="relative").run([dict(query)])
    [out] = Retriever(ix, k=3).run([dict(query)])
    assert [(d["id"], d["score"]) for d in out["docs"]] == [
        (d["id"], d["score"]) for d in fixed["docs"]
    ]
    assert out["docs"][0]["id"] == "t1"


def test_relative_fusion_leaves_out_a_list_of_weight_0():
    assert relative_fusion([[(0, 1.0), (1, 0.5)], [(2, 3.0)]], [1.0, 0.0], 5) == [
        (0, 1.0),
        (1, 0.0),
    ]
