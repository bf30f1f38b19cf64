import pytest

from sage_cli.operators.base import OptionError
from sage_cli.operators.head import Head


def test_head_cuts_across_batches_and_sets_done():
    op = Head(3)
    assert op.process([{"i": 0}, {"i": 1}]) == [{"i": 0}, {"i": 1}]
    assert not op.done
    assert op.process([{"i": 2}, {"i": 3}]) == [{"i": 2}]
    assert op.done
    assert op.process([{"i": 4}]) == []


def test_head_zero_is_done_before_any_input():
    assert Head(0).done


def test_head_negative_is_an_option_error():
    with pytest.raises(OptionError):
        Head(-1)
