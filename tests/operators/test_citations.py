"""Citations read back from answers, and groundedness against the retrieved text."""

import pytest

from sage_cli.operators.citations import (
    add_citations,
    cited_ids,
    cited_numbers,
    groundedness,
    strip_markers,
)
from sage_cli.operators.eval import Eval

DOCS = [
    {"id": "pass#0", "text": "The pass statement is a null operation: nothing happens."},
    {"id": "break#0", "text": "break terminates the nearest enclosing loop."},
    {"id": "while#0", "text": "The while statement is used for repeated execution."},
]


@pytest.mark.parametrize(
    ("answer", "numbers"),
    [
        ("pass is a null operation [1].", [1]),
        ("See [2] and [1, 3].", [2, 1, 3]),
        ("[3][3] twice [Document 2] and [doc 1 and 2]", [3, 2, 1]),
        ("no markers, [a] or [1.5] or [] are not citations", []),
    ],
)
def test_cited_numbers(answer, numbers):
    assert cited_numbers(answer) == numbers


def test_cited_ids_map_numbers_to_the_docs_shown_and_skip_invented_ones():
    assert cited_ids("It loops [3], see also [7] and [0].", DOCS) == ["while#0"]
    assert cited_ids("[2] [2] [1]", DOCS) == ["break#0", "pass#0"]
    assert cited_ids("[1]", [{"text": "no id"}, "plain string"]) == []


def test_add_citations_only_for_records_with_docs():
    record = {"answer": "A null operation [1].", "docs": DOCS}
    add_citations(record)
    assert record["citations"] == ["pass#0"]
    bare = {"answer": "Paris [1]."}
    add_citations(bare)
    assert "citations" not in bare
    uncited = {"answer": "Paris.", "docs": DOCS}
    add_citations(uncited)
    assert uncited["citations"] == []


def test_groundedness_is_the_share_of_content_words_found_in_the_docs():
    # content words: pass, statement, null, operation, everywhere -> 4 of 5 in the docs
    assert groundedness("The pass statement is a null operation everywhere [1].", DOCS) == 0.8
    assert groundedness("It is what it is [2].", DOCS) is None  # stop words only
    assert groundedness("anything", [{"id": "a"}]) is None  # docs given by id alone
    assert strip_markers("a [1] b [2, 3]") == "a   b  "


def test_eval_adds_groundedness_next_to_contains_without_needing_gold():
    out = Eval().run(
        [
            {"id": "q1", "answer": "A null operation [1].", "docs": DOCS, "gold": "null"},
            {"id": "q2", "answer": "Bananas grow on trees.", "docs": DOCS},
        ]
    )
    assert out[0]["eval"]["groundedness"] == 1.0 and out[0]["eval"]["contains"] == 1.0
    assert out[1]["eval"] == {"groundedness": 0.0}
    summary = out[-1]["eval"]
    assert summary["groundedness"] == 0.5
    assert list(summary)[:4] == ["exact_match", "f1", "contains", "groundedness"]
