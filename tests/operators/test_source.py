import errno
import os

import pytest

from sage_cli.operators.base import OptionError
from sage_cli.operators.ndjson import BadLine, numbered_lines
from sage_cli.operators.source import Source, walk


def items(op):
    return [i for i in op.records() if i is not None]


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.md").write_text("# A\n")
    (tmp_path / "sub" / "c.ndjson").write_text('{"x": 1}\n\n{"id": "own", "content": "c"}\n')
    (tmp_path / "sub" / "d.json").write_text('[{"y": 1}, {"y": 2}]')
    (tmp_path / "sub" / "e.csv").write_text("k,v\n1,one\n2,two\n")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    (tmp_path / ".hidden" / "h.txt").write_text("hidden")
    return tmp_path


def test_directory_is_read_recursively_in_sorted_order(tree):
    out = items(Source([str(tree)]))
    ids = [r["id"] for r in out]
    p = str(tree)
    assert ids == [
        f"{p}/a.md",
        f"{p}/b.txt",
        f"{p}/sub/c.ndjson:1",
        "own",
        f"{p}/sub/d.json:1",
        f"{p}/sub/d.json:2",
        f"{p}/sub/e.csv:2",
        f"{p}/sub/e.csv:3",
    ]
    assert out[1]["text"] == "bee"
    assert out[1]["metadata"]["bytes"] == 3 and out[1]["metadata"]["path"] == f"{p}/b.txt"
    assert out[1]["metadata"]["mtime"] == pytest.approx(os.stat(tree / "b.txt").st_mtime)
    assert out[3] == {"id": "own", "text": "c"}  # content renamed to text, own id kept
    assert out[6] == {"k": "1", "v": "one", "id": f"{p}/sub/e.csv:2"}


def test_same_input_twice_gives_same_ids_and_order(tree):
    assert items(Source([str(tree)])) == items(Source([str(tree)]))


def test_content_ids_are_stable_hashes(tmp_path):
    (tmp_path / "a.txt").write_text("same")
    (tmp_path / "b.txt").write_text("same")
    (tmp_path / "c.txt").write_text("other")
    ids = [r["id"] for r in items(Source([str(tmp_path)], id_by="content"))]
    assert ids[0] == ids[1] != ids[2]
    assert len(ids[0]) == 16 and int(ids[0], 16) >= 0


def test_glob_and_file_listed_twice_is_read_once(tree, monkeypatch):
    monkeypatch.chdir(tree)
    out = items(Source(["*.txt", "b.txt", "**/*.csv"]))
    assert [r["id"] for r in out] == ["b.txt", "sub/e.csv:2", "sub/e.csv:3"]


def test_raw_lines_skip_blanks_and_keep_line_numbers(tmp_path):
    (tmp_path / "q.txt").write_bytes(b"first\r\n\nthird\nno newline")
    out = items(Source([str(tmp_path / "q.txt")], raw=True))
    assert [(r["id"].rsplit(":", 1)[1], r["text"]) for r in out] == [
        ("1", "first"),
        ("3", "third"),
        ("4", "no newline"),
    ]


def test_stdin_is_ndjson_by_default_and_raw_with_flag():
    import io

    out = items(Source(["-"], stdin=io.BytesIO(b'{"a": 1}\nnot json\n')))
    assert out[0] == {"a": 1, "id": "stdin:1"}
    assert isinstance(out[1], BadLine) and out[1].message().startswith("stdin:2: invalid JSON")
    out = items(Source(None, raw=True, stdin=io.BytesIO(b"x\ny\n")))
    assert out == [{"id": "stdin:1", "text": "x"}, {"id": "stdin:2", "text": "y"}]


def test_bad_ndjson_line_names_file_and_line(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"a": 1}\n[1]\n{"a": 3}\n')
    out = items(Source([str(f)]))
    assert out[0]["a"] == 1 and out[2]["a"] == 3
    assert out[1].origin == str(f) and out[1].line == 2 and "array" in out[1].reason


def test_json_scalar_and_invalid_json_are_bad_lines(tmp_path):
    (tmp_path / "s.json").write_text("42")
    (tmp_path / "t.json").write_text('{"a": 1,\n "b": }')
    (tmp_path / "u.json").write_text('{"a": 1}')
    out = items(Source([str(tmp_path)]))
    assert isinstance(out[0], BadLine) and "array of objects" in out[0].reason
    assert isinstance(out[1], BadLine) and out[1].line == 2 and "invalid JSON" in out[1].reason
    assert out[2] == {"a": 1, "id": str(tmp_path / "u.json")}


def test_csv_row_with_extra_fields_is_a_bad_line(tmp_path):
    (tmp_path / "r.csv").write_text('a,b\n1,2\n1,2,3\n"multi\nline",5\n')
    out = items(Source([str(tmp_path / "r.csv")]))
    assert out[0]["a"] == "1"
    assert isinstance(out[1], BadLine) and out[1].line == 3 and "3 fields" in out[1].reason
    assert out[2]["a"] == "multi\nline" and out[2]["b"] == "5"


def test_invalid_utf8_text_is_replaced_with_a_warning(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"ok \xff end")
    (record,) = items(Source([str(tmp_path / "bad.txt")]))
    assert record["text"] == "ok \ufffd end"
    assert "invalid UTF-8 at byte 3" in record["_warnings"][0]
    assert "warning" not in record["metadata"]


def test_empty_files_give_no_records_or_one_empty_text(tmp_path):
    (tmp_path / "e.ndjson").write_text("")
    (tmp_path / "e.json").write_text("")
    (tmp_path / "e.txt").write_text("")
    out = items(Source([str(tmp_path)]))
    assert out == [
        {
            "id": str(tmp_path / "e.txt"),
            "text": "",
            "metadata": {
                "path": str(tmp_path / "e.txt"),
                "bytes": 0,
                "mtime": pytest.approx(os.stat(tmp_path / "e.txt").st_mtime),
            },
        }
    ]


def test_missing_path_is_an_option_error(tmp_path):
    with pytest.raises(OptionError, match="no such file"):
        items(Source([str(tmp_path / "nope.txt")]))
    with pytest.raises(OptionError, match="no file matches"):
        items(Source([str(tmp_path / "*.nope")]))


def test_unlistable_directory_is_a_permission_error_naming_it(tmp_path, monkeypatch):
    (tmp_path / "locked").mkdir()
    real_scandir = os.scandir

    def scandir(path):
        if str(path).endswith("locked"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(OptionError, match=f"{tmp_path}/locked: permission denied"):
        walk(str(tmp_path))


def test_watch_refuses_stdin_and_bad_options():
    with pytest.raises(OptionError, match="stdin"):
        Source(["-"], watch=True)
    with pytest.raises(OptionError, match="--id-by"):
        Source(["x"], id_by="random")


def test_live_lines_mark_idle_after_each_chunk():
    import io

    got = list(numbered_lines(io.BytesIO(b"a\nb\n"), live=True))
    assert got == [(1, b"a"), (2, b"b"), (2, None)]


def test_long_single_line_is_read_whole(tmp_path):
    big = b'{"text": "' + b"x" * (3 * 1024 * 1024) + b'"}'
    (tmp_path / "big.ndjson").write_bytes(big)
    (record,) = items(Source([str(tmp_path / "big.ndjson")]))
    assert len(record["text"]) == 3 * 1024 * 1024


def test_error_records_pass_through_untouched():
    import io

    err = {"_error": {"stage": "sage map", "line": 1, "error": "x"}}
    out = items(
        Source(
            ["-"], stdin=io.BytesIO(b'{"_error": {"stage": "sage map", "line": 1, "error": "x"}}\n')
        )
    )
    assert out == [err]


def test_path_ids_do_not_depend_on_how_the_directory_is_spelled(tree, monkeypatch):
    monkeypatch.chdir(tree)
    a = [r["id"] for r in items(Source(["./sub/"]))]
    b = [r["id"] for r in items(Source(["sub"]))]
    assert a == b and a[0] == "sub/c.ndjson:1"


def test_glob_match_keeps_star_within_a_directory(tmp_path):
    from sage_cli.operators.source import _glob_match

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.md").write_text("d")
    assert _glob_match("/w/a.md", "/w/*.md")
    assert not _glob_match("/w/sub/d.md", "/w/*.md")
    assert _glob_match(str(tmp_path / "sub" / "d.md"), str(tmp_path / "**" / "*.md"))
