import csv
import io
import os

import orjson
import pytest

from sage_cli.operators.base import OptionError
from sage_cli.operators.sink import Sink, to_csv, to_markdown

RECS = [
    {"id": "a", "text": "x,y", "meta": {"k": [1, 2]}},
    {"id": "b", "n": 2, "ok": True, "none": None},
]


def test_ndjson_without_file_passes_records_through():
    op = Sink()
    op.setup()
    assert op.process(list(RECS)) == RECS
    assert op.close() == []


def test_to_file_appears_only_at_close(tmp_path):
    dest = tmp_path / "out.ndjson"
    op = Sink(to=str(dest))
    op.setup()
    assert op.process(list(RECS)) == []
    assert not dest.exists()
    op.close()
    assert [orjson.loads(line) for line in dest.read_bytes().splitlines()] == RECS
    assert [p.name for p in tmp_path.iterdir()] == ["out.ndjson"]  # no temp file left


def test_abandoned_run_keeps_the_old_file_and_removes_the_temp(tmp_path):
    dest = tmp_path / "out.ndjson"
    dest.write_text("old\n")
    os.chmod(dest, 0o640)
    op = Sink(to=str(dest))
    op.setup()
    op.process(list(RECS))
    assert len(list(tmp_path.iterdir())) == 2
    op.abandon()
    assert dest.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.ndjson"]
    op = Sink(to=str(dest))
    op.setup()
    op.process(list(RECS))
    op.close()
    assert os.stat(dest).st_mode & 0o777 == 0o640  # replacing keeps the file's mode


def test_json_is_one_array_written_as_it_comes(tmp_path):
    dest = tmp_path / "out.json"
    op = Sink("json", str(dest))
    op.setup()
    op.process([RECS[0]])
    op.process([RECS[1]])
    op.close()
    assert orjson.loads(dest.read_bytes()) == RECS


def test_json_of_nothing_is_an_empty_array():
    buf = io.BytesIO()
    op = Sink("json", stream=buf)
    op.run([])
    assert orjson.loads(buf.getvalue()) == []


def test_csv_has_union_of_keys_and_json_for_nested():
    rows = list(csv.reader(io.StringIO(to_csv(RECS).decode())))
    assert rows[0] == ["id", "text", "meta", "n", "ok", "none"]
    assert rows[1] == ["a", "x,y", '{"k":[1,2]}', "", "", ""]
    assert rows[2] == ["b", "", "", "2", "true", ""]
    assert to_csv([]) == b""


def test_markdown_table_escapes_pipes_and_newlines():
    md = to_markdown([{"a": "p|q", "b": "two\nlines"}, {"c": 1}]).decode().splitlines()
    assert md[0] == "| a | b | c |"
    assert md[1] == "| --- | --- | --- |"
    assert md[2] == "| p\\|q | two<br>lines |  |"
    assert md[3] == "|  |  | 1 |"


def test_csv_and_md_hold_input_until_close():
    buf = io.BytesIO()
    op = Sink("csv", stream=buf)
    assert op.memory == "whole-input"
    op.setup()
    op.process(list(RECS))
    assert buf.getvalue() == b""
    op.close()
    assert buf.getvalue().startswith(b"id,text,meta")


def test_pretty_aligns_fields_and_wraps_long_text():
    out = io.StringIO()
    op = Sink(pretty=True, console_file=out, width=40)
    op.setup()
    assert op.process([{"id": "doc-1", "text": "word " * 30, "score": 0.5}]) == []
    lines = out.getvalue().splitlines()
    assert all(len(line) <= 40 for line in lines)
    text_rows = [line for line in lines if "word" in line]
    assert len(text_rows) >= 4  # wrapped
    start = text_rows[0].index("word")
    assert all(row.index("word") == start for row in text_rows)  # aligned under one column
    assert any(line.strip().startswith("score 0.5") for line in lines)


def test_bad_options():
    with pytest.raises(OptionError, match="--format"):
        Sink("xml")
    with pytest.raises(OptionError, match="--pretty"):
        Sink(pretty=True, to="x")


def test_destination_directory_must_exist(tmp_path):
    with pytest.raises(OptionError, match="no such directory"):
        Sink(to=str(tmp_path / "no" / "x.ndjson")).setup()
    with pytest.raises(OptionError, match="is a directory"):
        Sink(to=str(tmp_path)).setup()
