"""Fusion of the dense and BM25 rankings, hand-computed."""

import numpy as np
import pytest

from sage_cli.operators.base import OptionError
from sage_cli.operators.index import ModelRef, write_index
from sage_cli.operators.retrieve import DEFAULT_MODE, Retriever, relative_fusion, rrf


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


def test_hybrid_relative_fusion_is_the_default(tmp_path):
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
