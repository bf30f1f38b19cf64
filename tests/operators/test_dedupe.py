import pytest

from sage_cli.operators.base import OptionError, RecordError
from sage_cli.operators.dedupe import Dedupe


def test_dedupe_keeps_first_per_id_across_batches():
    op = Dedupe()
    assert op.process([{"id": 1, "v": "a"}, {"id": 2}, {"id": 1, "v": "b"}]) == [
        {"id": 1, "v": "a"},
        {"id": 2},
    ]
    assert op.process([{"id": 2}, {"id": 3}]) == [{"id": 3}]
    assert op.dropped == 2


def test_dedupe_distinguishes_json_types_and_compares_nested_values():
    op = Dedupe(["k"])
    out = op.process(
        [{"k": 1}, {"k": "1"}, {"k": True}, {"k": {"a": 1, "b": 2}}, {"k": {"b": 2, "a": 1}}]
    )
    assert [r["k"] for r in out] == [1, "1", True, {"a": 1, "b": 2}]


def test_dedupe_compound_and_dotted_keys():
    op = Dedupe(["metadata.path", "lang"])
    recs = [
        {"metadata": {"path": "a"}, "lang": "en"},
        {"metadata": {"path": "a"}, "lang": "fr"},
        {"metadata": {"path": "a"}, "lang": "en"},
    ]
    assert op.process(recs) == recs[:2]


def test_dedupe_max_keys_forgets_the_oldest():
    op = Dedupe(max_keys=2)
    ids = [1, 2, 3, 1, 3]
    out = op.process([{"id": i} for i in ids])
    assert [r["id"] for r in out] == [1, 2, 3, 1]
    assert len(op.seen) == 2


def test_dedupe_bad_record_changes_no_state():
    op = Dedupe()
    with pytest.raises(RecordError, match="'id'"):
        op.process([{"id": 1}, {"nope": 2}])
    assert op.process([{"id": 1}]) == [{"id": 1}]  # the failed batch remembered nothing


def test_dedupe_rejects_zero_max_keys():
    with pytest.raises(OptionError):
        Dedupe(max_keys=0)
