from tests.conftest import ndjson, parse_ndjson


def test_chunk_command_splits_and_passes_fields(cli):
    doc = {"id": "a", "text": "# T\none two three four five six", "k": 1}
    result = cli("chunk", "--by", "tokens", "--size", "3", "--overlap", "1", input=ndjson([doc]))
    assert result.exit_code == 0, result.stderr
    out = parse_ndjson(result.stdout)
    assert [r["text"] for r in out] == ["# T\none", "one two three", "three four five", "five six"]
    assert [r["id"] for r in out] == ["a#0", "a#1", "a#2", "a#3"]
    assert all(
        r["k"] == 1 and r["parent_id"] == "a" and r["metadata"]["heading"] == "T" for r in out
    )


def test_chunk_missing_text_is_data_error_naming_field(cli):
    result = cli("chunk", input=ndjson([{"id": "a", "body": "x"}]))
    assert result.exit_code == 65
    assert "stdin:1" in result.stderr and "'text'" in result.stderr


def test_chunk_bad_overlap_is_usage_error(cli):
    result = cli("chunk", "--size", "5", "--overlap", "5", input=b"")
    assert result.exit_code == 2
    assert "--overlap" in result.stderr
