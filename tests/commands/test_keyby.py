from tests.conftest import ndjson, parse_ndjson


def test_keyby_writes_key(cli):
    result = cli("keyby", "user", input=ndjson([{"user": "a"}, {"user": "b", "_error": {"e": 1}}]))
    assert result.exit_code == 0
    out = parse_ndjson(result.stdout)
    assert out[0] == {"user": "a", "_key": "a"}
    assert out[1] == {"user": "b", "_error": {"e": 1}}  # error records pass untouched


def test_keyby_missing_field_exit_65_names_line(cli):
    result = cli("keyby", "user", input=ndjson([{"user": "a"}, {"x": 1}]))
    assert result.exit_code == 65 and "stdin:2" in result.stderr and "'user'" in result.stderr
    assert parse_ndjson(result.stdout) == [{"user": "a", "_key": "a"}]


def test_keyby_requires_a_field(cli):
    result = cli("keyby", input=b"")
    assert result.exit_code == 2
