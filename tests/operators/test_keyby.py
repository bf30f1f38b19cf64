import pytest

from sage_cli.operators.base import OptionError, RecordError
from sage_cli.operators.keyby import KeyBy


def test_keyby_one_field_copies_value_and_keeps_the_rest():
    out = KeyBy(["user"]).process([{"user": "ann", "x": 1}, {"user": 7}])
    assert out == [{"user": "ann", "x": 1, "_key": "ann"}, {"user": 7, "_key": 7}]


def test_keyby_several_and_nested_fields_make_a_list():
    out = KeyBy(["a", "m.b"]).process([{"a": 1, "m": {"b": "x"}}])
    assert out[0]["_key"] == [1, "x"]


def test_keyby_missing_field_is_a_record_error_and_changes_nothing():
    batch = [{"user": "a"}, {"other": 1}]
    with pytest.raises(RecordError, match="'user'"):
        KeyBy(["user"]).process(batch)
    assert "_key" not in batch[0]


def test_keyby_needs_a_field():
    with pytest.raises(OptionError):
        KeyBy([])
