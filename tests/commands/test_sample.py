from tests.conftest import ndjson, parse_ndjson

INPUT = ndjson([{"i": i} for i in range(500)])


def test_sample_rate_with_seed_is_reproducible(cli):
    a = cli("sample", "--rate", "0.2", "--seed", "42", input=INPUT)
    b = cli("sample", "--rate", "0.2", "--seed", "42", "--batch-size", "3", input=INPUT)
    assert a.exit_code == 0
    assert a.stdout == b.stdout
    assert 60 < len(parse_ndjson(a.stdout)) < 140


def test_sample_n_writes_exactly_n(cli):
    result = cli("sample", "--n", "7", "--seed", "1", input=INPUT)
    out = parse_ndjson(result.stdout)
    assert result.exit_code == 0 and len(out) == 7
    assert [r["i"] for r in out] == sorted(r["i"] for r in out)


def test_sample_needs_rate_or_n(cli):
    result = cli("sample", input=INPUT)
    assert result.exit_code == 2 and "--rate" in result.stderr
