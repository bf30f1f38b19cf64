from tests.conftest import ndjson, parse_ndjson


def table(tmp_path, rows):
    path = tmp_path / "table.ndjson"
    path.write_bytes(ndjson(rows))
    return str(path)


def test_join_inner_and_left(cli, tmp_path):
    t = table(tmp_path, [{"id": "a", "label": "yes"}])
    stream = ndjson([{"id": "a"}, {"id": "b"}])
    result = cli("join", t, "--on", "id", input=stream)
    assert result.exit_code == 0
    assert parse_ndjson(result.stdout) == [{"id": "a", "label": "yes"}]
    result = cli("join", t, "--on", "id", "--how", "left", "--prefix", "gold_", input=stream)
    assert parse_ndjson(result.stdout) == [{"id": "a", "gold_label": "yes"}, {"id": "b"}]


def test_join_missing_table_is_exit_69(cli, tmp_path):
    result = cli("join", str(tmp_path / "none.ndjson"), "--on", "id", input=b"")
    assert result.exit_code == 69
    assert "lookup table" in result.stderr and "none.ndjson" in result.stderr
    assert result.stderr.count("\n") == 1


def test_join_bad_table_line_names_table_and_line(cli, tmp_path):
    path = tmp_path / "t.ndjson"
    path.write_text('{"id": 1}\n{broken\n')
    result = cli("join", str(path), "--on", "id", input=b"")
    assert result.exit_code == 69 and f"{path}:2:" in result.stderr


def test_join_record_without_key_is_exit_65(cli, tmp_path):
    t = table(tmp_path, [{"id": "a", "v": 1}])
    result = cli("join", t, "--on", "id", input=ndjson([{"id": "a"}, {"x": 1}]))
    assert result.exit_code == 65 and "stdin:2" in result.stderr
    assert parse_ndjson(result.stdout) == [{"id": "a", "v": 1}]


def test_join_bad_how_is_usage_error(cli, tmp_path):
    t = table(tmp_path, [{"id": "a"}])
    result = cli("join", t, "--on", "id", "--how", "outer", input=b"")
    assert result.exit_code == 2 and "--how" in result.stderr
