from tests.conftest import ndjson, parse_ndjson


def test_map_adds_a_field(cli):
    result = cli("map", 'r | {"n": len(r["text"])}', input=ndjson([{"text": "abc"}, {"text": ""}]))
    assert result.exit_code == 0, result.stderr
    assert parse_ndjson(result.stdout) == [{"text": "abc", "n": 3}, {"text": "", "n": 0}]


def test_map_expression_error_names_expression_and_line(cli):
    result = cli("map", 'r | {"n": r["missing"]}', input=ndjson([{"a": 1}]))
    assert result.exit_code == 65
    assert "stdin:1" in result.stderr and 'r["missing"]' in result.stderr
    assert result.stderr.count("\n") == 1


def test_map_non_object_result_is_record_error_and_emit_keeps_going(cli):
    result = cli(
        "map",
        '1 if r["a"] == 2 else r',
        "--on-error",
        "emit",
        input=ndjson([{"a": 1}, {"a": 2}, {"a": 3}]),
    )
    assert result.exit_code == 0
    out = parse_ndjson(result.stdout)
    assert [r.get("a") for r in out] == [1, 2, 3]
    assert "_error" in out[1] and "must return an object" in out[1]["_error"]["error"]
    assert out[1]["_error"]["line"] == 2


def test_map_syntax_error_is_usage_error(cli):
    result = cli("map", "r[", input=b"")
    assert result.exit_code == 2
    assert "invalid expression" in result.stderr


def test_map_fn_loads_module_function(cli, tmp_path, monkeypatch):
    (tmp_path / "mymod.py").write_text("def up(r):\n    return {**r, 'text': r['text'].upper()}\n")
    monkeypatch.chdir(tmp_path)
    result = cli("map", "--fn", "mymod:up", input=ndjson([{"text": "hi"}]))
    assert result.exit_code == 0, result.stderr
    assert parse_ndjson(result.stdout) == [{"text": "HI"}]


def test_errors_file_collects_bad_lines(cli, tmp_path):
    dead = tmp_path / "dead.ndjson"
    result = cli(
        "map",
        "r",
        "--on-error",
        "skip",
        "--errors",
        str(dead),
        input=b'{"a":1}\nnot json\n{"a":2}\n',
    )
    assert result.exit_code == 0
    assert parse_ndjson(result.stdout) == [{"a": 1}, {"a": 2}]
    dead_records = parse_ndjson(dead.read_bytes())
    assert len(dead_records) == 1 and dead_records[0]["line"] == 2
    assert dead_records[0]["raw"] == "not json"
