import math

import pytest

from sage_cli.operators.base import OptionError, RecordError
from sage_cli.operators.eval import (
    Eval,
    answer_scores,
    contains,
    exact_match,
    format_table,
    normalize_answer,
    retrieval_scores,
    token_f1,
)


def test_squad_normalisation():
    assert normalize_answer("  The Eiffel-Tower, in PARIS!  ") == "eiffeltower in paris"
    assert normalize_answer("a an the") == ""
    assert normalize_answer("Theatre") == "theatre"  # articles only as whole words


def test_hand_computed_answer_scores():
    # answer -> "eiffel tower is in paris" (5 tokens)
    # gold 1 -> "paris france": 1 common, P=1/5, R=1/2, F1 = 2*.2*.5/.7 = 2/7
    # gold 2 -> "paris":        1 common, P=1/5, R=1,   F1 = 2*.2*1/1.2 = 1/3  (the max)
    answer = "The Eiffel Tower is in Paris."
    assert token_f1(answer, "Paris, France") == pytest.approx(2 / 7)
    assert token_f1(answer, "paris") == pytest.approx(1 / 3)
    scores = answer_scores(answer, ["Paris, France", "paris"])
    assert scores == {"exact_match": 0.0, "f1": pytest.approx(1 / 3), "contains": 1.0}


def test_exact_match_and_contains_edge_cases():
    assert exact_match("The Paris.", "paris") == 1.0
    assert exact_match("Paris France", "paris") == 0.0
    assert contains("it is paris france", "Paris, France") == 1.0
    assert contains("parisian food", "paris") == 0.0  # whole tokens only
    assert token_f1("", "") == 1.0 and token_f1("the", "paris") == 0.0
    assert token_f1("paris paris", "paris") == pytest.approx(2 / 3)  # P=1/2, R=1


def test_hand_computed_retrieval_scores():
    # top 3: x, g1#0 (hit for g1 at rank 2), y; g2 at rank 4 is past k.
    hits = [{"id": "x"}, {"id": "g1#0"}, {"id": "y"}, {"id": "g2"}]
    scores = retrieval_scores(hits, ["g1", "g2", "g3"], k=3)
    assert scores["recall@3"] == pytest.approx(1 / 3)
    assert scores["mrr"] == 0.5
    # DCG = 1/log2(3); ideal DCG for 3 relevant within k=3 = 1 + 1/log2(3) + 1/2
    assert scores["ndcg@3"] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3) + 0.5))
    assert scores["ndcg@3"] == pytest.approx(0.29608, abs=1e-5)


def test_retrieval_counts_each_gold_once_and_matches_parent_ids():
    hits = [{"id": "c1", "parent_id": "d"}, {"id": "c2", "metadata": {"parent_id": "d"}}, "e"]
    scores = retrieval_scores(hits, ["d", "e"], k=5)
    assert scores["recall@5"] == 1.0 and scores["mrr"] == 1.0
    # relevant at ranks 1 and 3 (rank 2 repeats d): (1 + 1/2) / (1 + 1/log2(3))
    assert scores["ndcg@5"] == pytest.approx(1.5 / (1 + 1 / math.log2(3)))
    assert retrieval_scores([], ["d"], k=5) == {"recall@5": 0.0, "mrr": 0.0, "ndcg@5": 0.0}


def test_operator_adds_eval_and_summary_means():
    op = Eval(k=2)
    out = op.run(
        [
            {"id": "q1", "answer": "Paris", "gold": "paris", "extra": [1]},
            {
                "id": "q2",
                "answer": "Lyon",
                "gold": ["Paris"],
                "docs": [{"id": "a"}, {"id": "b"}],
                "gold_ids": ["b"],
            },
        ]
    )
    assert [r["id"] for r in out] == ["q1", "q2", "_summary"]
    assert out[0]["extra"] == [1]
    assert out[0]["eval"] == {"exact_match": 1.0, "f1": 1.0, "contains": 1.0}
    assert out[1]["eval"]["recall@2"] == 1.0 and out[1]["eval"]["mrr"] == 0.5
    summary = out[2]
    assert summary["_summary"] is True and summary["count"] == 2
    assert summary["eval"]["exact_match"] == 0.5
    assert summary["eval"]["mrr"] == 0.5  # mean over the one record that has gold_ids
    assert "mrr" in format_table(summary) and "0.5000" in format_table(summary)
    assert op.summary().startswith("means\nmetric") and "(n=2)" in op.summary()


def test_failing_record_does_not_count_in_the_summary():
    op = Eval()
    with pytest.raises(RecordError, match="'answer'"):
        op.process([{"answer": "x", "gold": "x"}, {"gold": "y"}])
    assert op.count == 0
    op.process([{"answer": "x", "gold": "x"}])
    assert op.close()[0]["count"] == 1


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"text": "x"}, "neither 'gold'"),
        ({"answer": "x", "gold": []}, "'gold' must be"),
        ({"answer": 3, "gold": "x"}, "'answer' must be str"),
        ({"gold_ids": ["a"]}, "no 'docs'"),
        ({"gold_ids": "a", "docs": "a"}, "'docs' must be a list"),
    ],
)
def test_bad_records(record, message):
    with pytest.raises(RecordError, match=message):
        Eval().process([record])


def test_no_summary_on_empty_input_or_when_disabled():
    assert Eval().run([]) == []
    assert len(Eval(summary=False).run([{"answer": "a", "gold": "a"}])) == 1
    with pytest.raises(OptionError):
        Eval(k=0)


def test_previous_summary_passes_through():
    summary = {"id": "_summary", "_summary": True, "count": 1, "eval": {}}
    out = Eval().run([summary, {"answer": "a", "gold": "a"}])
    assert out[0] == summary and out[-1]["count"] == 1


def test_scores_retrieval_alone_when_gold_answers_have_no_answer_yet():
    # `retrieve | eval` over a gold file: answer metrics are left out, retrieval is scored
    record = {"gold": ["x"], "gold_ids": ["d1"], "docs": [{"id": "d2"}, {"id": "d1"}]}
    scores = Eval(k=2).process([record])[0]["eval"]
    assert scores["mrr"] == 0.5 and scores["recall@2"] == 1.0
    assert "exact_match" not in scores


def test_gold_without_answer_or_docs_is_a_record_error():
    with pytest.raises(RecordError, match="no 'answer'"):
        Eval().process([{"gold": ["x"]}])


def test_contains_splits_code_answers_on_punctuation():
    assert contains('It is called "object.__new__(cls[, ...])"', "__new__") == 1.0
    assert contains("multiplication with pow(2, n)", "pow(2,n)") == 1.0
    assert contains("renewal", "new") == 0.0  # still whole tokens, not substrings
