from tests.conftest import ndjson, parse_ndjson


def test_dedupe_by_id_default(cli):
    result = cli("dedupe", input=ndjson([{"id": "a", "n": 1}, {"id": "b"}, {"id": "a", "n": 2}]))
    assert result.exit_code == 0
    assert parse_ndjson(result.stdout) == [{"id": "a", "n": 1}, {"id": "b"}]


def test_dedupe_by_field_with_missing_key_emitted_as_error(cli):
    recs = [{"url": "x"}, {"other": 1}, {"url": "x"}, {"url": "y"}]
    result = cli("dedupe", "--key", "url", "--on-error", "emit", input=ndjson(recs))
    assert result.exit_code == 0
    out = parse_ndjson(result.stdout)
    assert [r.get("url") for r in out] == ["x", None, "y"]
    assert out[1]["_error"]["line"] == 2 and "'url'" in out[1]["_error"]["error"]


def test_dedupe_missing_key_fails_with_line(cli):
    result = cli("dedupe", input=ndjson([{"id": 1}, {"x": 1}]))
    assert result.exit_code == 65 and "stdin:2" in result.stderr
    assert parse_ndjson(result.stdout) == [{"id": 1}]


def test_dedupe_max_keys(cli):
    result = cli("dedupe", "--max-keys", "1", input=ndjson([{"id": 1}, {"id": 2}, {"id": 1}]))
    assert [r["id"] for r in parse_ndjson(result.stdout)] == [1, 2, 1]
