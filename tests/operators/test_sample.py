import pytest

from sage_cli.operators.base import OptionError
from sage_cli.operators.sample import Sample

RECS = [{"i": i} for i in range(2000)]


def test_rate_sample_is_about_the_rate_in_order_and_seeded():
    out = Sample(rate=0.25, seed=3).run(list(RECS))
    assert 400 < len(out) < 600
    assert [r["i"] for r in out] == sorted(r["i"] for r in out)
    assert Sample(rate=0.25, seed=3).run(list(RECS)) == out


def test_rate_sample_does_not_depend_on_batch_size():
    whole = Sample(rate=0.5, seed=1).process(list(RECS))
    op = Sample(rate=0.5, seed=1)
    parts = [r for start in range(0, len(RECS), 7) for r in op.process(RECS[start : start + 7])]
    assert parts == whole


def test_rate_edges():
    assert Sample(rate=0.0).run(list(RECS)) == []
    assert Sample(rate=1.0).run(list(RECS)) == RECS


def test_reservoir_keeps_exactly_n_in_input_order_at_close():
    op = Sample(n=10, seed=5)
    assert op.process(list(RECS)) == []
    out = op.close()
    assert len(out) == 10 and [r["i"] for r in out] == sorted(r["i"] for r in out)
    assert op.memory == "bounded"


def test_reservoir_is_roughly_uniform():
    counts = [0] * 10
    for seed in range(400):
        for r in Sample(n=3, seed=seed).run([{"i": i} for i in range(10)]):
            counts[r["i"]] += 1
    assert all(80 < c < 160 for c in counts)  # expected 120 each


def test_reservoir_with_fewer_records_keeps_all():
    assert Sample(n=5).run([{"i": 1}, {"i": 2}]) == [{"i": 1}, {"i": 2}]


def test_sample_options_are_checked():
    for kwargs in ({}, {"rate": 0.1, "n": 2}, {"rate": 1.5}, {"n": -1}):
        with pytest.raises(OptionError):
            Sample(**kwargs)
