import pytest

from sage_cli.operators.base import OptionError, RecordError
from sage_cli.operators.join import Join

TABLE = [
    {"uid": 1, "name": "ann", "text": "table text"},
    {"uid": 2, "name": "bob"},
    {"uid": 2, "name": "bob2"},
    {"name": "no key"},
]


def test_inner_join_enriches_and_drops_unmatched():
    out = Join(TABLE, "uid").process([{"uid": 1, "text": "mine"}, {"uid": 3}])
    assert out == [{"uid": 1, "text": "mine", "name": "ann"}]  # the record's own text wins


def test_left_join_passes_unmatched_unchanged():
    out = Join(TABLE, "uid", how="left").process([{"uid": 3, "x": 1}])
    assert out == [{"uid": 3, "x": 1}]


def test_several_matching_rows_give_one_record_each():
    out = Join(TABLE, "uid").process([{"uid": 2}])
    assert [r["name"] for r in out] == ["bob", "bob2"]


def test_prefix_adds_fields_under_a_prefix():
    out = Join(TABLE, "uid", prefix="t_").process([{"uid": 1, "text": "mine"}])
    assert out == [{"uid": 1, "text": "mine", "t_name": "ann", "t_text": "table text"}]


def test_keys_match_by_json_value_not_python_equality():
    out = Join([{"k": 1, "v": "int"}, {"k": "1", "v": "str"}], "k").process([{"k": "1"}])
    assert out == [{"k": "1", "v": "str"}]


def test_nested_key():
    out = Join([{"m": {"id": "a"}, "v": 1}], "m.id").process([{"m": {"id": "a"}}])
    assert out[0]["v"] == 1


def test_record_without_key_is_a_record_error():
    with pytest.raises(RecordError, match="'uid'"):
        Join(TABLE, "uid").process([{"x": 1}])


def test_wrong_on_field_or_how_is_an_option_error():
    with pytest.raises(OptionError, match="--on"):
        Join(TABLE, "nope")
    with pytest.raises(OptionError, match="--how"):
        Join(TABLE, "uid", how="outer")


def test_empty_table_matches_nothing():
    assert Join([], "uid").process([{"uid": 1}]) == []
