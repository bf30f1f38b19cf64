from tests.conftest import ndjson, parse_ndjson

QA = {"id": "1", "query": "Who?", "docs": [{"id": "d", "text": "Ann wrote it."}]}


def test_prompt_qa(cli):
    result = cli("prompt", "--system", "Be brief.", input=ndjson([QA]))
    assert result.exit_code == 0, result.stderr
    (out,) = parse_ndjson(result.stdout)
    assert "[1] Ann wrote it." in out["prompt"] and out["messages"][0]["content"] == "Be brief."


def test_prompt_template_file_and_missing_field(cli, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("Title: {metadata[title]}\n")
    good = {"metadata": {"title": "T"}}
    result = cli("prompt", "-t", str(path), "--on-error", "emit", input=ndjson([good, {"x": 1}]))
    assert result.exit_code == 0, result.stderr
    out = parse_ndjson(result.stdout)
    assert out[0]["prompt"] == "Title: T"
    assert "'metadata'" in out[1]["_error"]["error"]
    failed = cli("prompt", "-t", str(path), input=ndjson([{"x": 1}]))
    assert failed.exit_code == 65 and "metadata" in failed.stderr


def test_malformed_template_is_exit_2_before_reading(cli, tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("Question: {query\n")
    result = cli("prompt", "-t", str(path), input=b"not even json\n")
    assert result.exit_code == 2
    assert "malformed template" in result.stderr and result.stdout == ""


def test_unknown_template_is_exit_2(cli):
    result = cli("prompt", "-t", "nope", input=b"")
    assert result.exit_code == 2 and "qa" in result.stderr


def test_context_tokens_truncates_with_warning(cli):
    record = {"query": "q", "docs": ["word " * 300]}
    result = cli("prompt", "--context-tokens", "30", input=ndjson([record]))
    (out,) = parse_ndjson(result.stdout)
    assert out["prompt_truncated"] is True and out["_warnings"]
