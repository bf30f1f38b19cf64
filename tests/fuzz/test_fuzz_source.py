"""Fuzzing `sage source` for every file type it reads (operators/source.py: text, ndjson, json,
csv and raw lines): any bytes in a file of each extension give records or clean per-line errors
(BadLine -> exit 65 or the --on-error behaviour, one line on stderr), never a traceback, a hang
or a silently lost line.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from sage_cli.operators.ndjson import BadLine
from sage_cli.operators.source import BadFile, Source
from tests.conftest import parse_ndjson, run_sage
from tests.fuzz.conftest import examples
from tests.fuzz.strategies import NASTY, json_values, mutated

EXTENSIONS = {
    "text": ".txt",
    "md": ".md",
    "rst": ".rst",
    "ndjson": ".ndjson",
    "jsonl": ".jsonl",
    "json": ".json",
    "csv": ".csv",
}

# -- input strategies ------------------------------------------------------------------------

records = st.dictionaries(
    st.sampled_from(["id", "text", "content", "_error", "x"]),
    json_values(max_leaves=12, max_size=4),
)
ndjson_bytes = st.lists(records, max_size=6).map(
    lambda rs: b"".join(orjson.dumps(r) + b"\n" for r in rs)
)
json_bytes = (st.lists(records, max_size=5) | records | json_values(max_leaves=12, max_size=4)).map(
    lambda v: orjson.dumps(v, option=orjson.OPT_INDENT_2)
)
cells = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12) | (
    st.sampled_from(['"', ",", "\n", "\r\n", "\x00", '""', "a,b", "x" * 40])
)


def _csv_text(rows: list[list[str]]) -> bytes:
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    return out.getvalue().encode("utf-8", "surrogatepass")


csv_bytes = st.lists(st.lists(cells, min_size=1, max_size=4), max_size=6).map(_csv_text)
any_bytes = st.binary(max_size=600) | st.lists(st.sampled_from(NASTY), max_size=30).map(b"".join)
file_bytes = {
    "text": any_bytes,
    "md": any_bytes,
    "rst": any_bytes,
    "ndjson": any_bytes | ndjson_bytes | mutated(ndjson_bytes),
    "jsonl": ndjson_bytes | mutated(ndjson_bytes),
    "json": any_bytes | json_bytes | mutated(json_bytes),
    "csv": any_bytes | csv_bytes | mutated(csv_bytes),
}

# -- the in-process properties ---------------------------------------------------------------


def read_items(path: Path, **options: object) -> list[dict | BadLine]:
    items = [item for item in Source([str(path)], **options).records() if item is not None]  # type: ignore[arg-type]
    for item in items:
        if isinstance(item, BadLine):
            assert item.origin == str(path)
            # a line number, or 0 for a whole file refused (binary content, a corrupt PDF)
            assert item.line >= 1 or (isinstance(item, BadFile) and item.line == 0)
            assert item.reason and "\n" not in item.message(), item.message()
        else:
            assert isinstance(item, dict), item
            assert "id" in item or "_error" in item, item
    return items


def _write(data: bytes, suffix: str) -> Path:
    fd, name = tempfile.mkstemp(suffix=suffix, prefix="fuzz-source-")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return Path(name)


def _non_blank_lines(data: bytes) -> int:
    return sum(1 for line in data.split(b"\n") if line.strip())


@given(st.sampled_from(sorted(EXTENSIONS)).flatmap(lambda k: st.tuples(st.just(k), file_bytes[k])))
def test_any_bytes_in_any_file_type_is_records_or_bad_lines(case: tuple[str, bytes]) -> None:
    kind, data = case
    path = _write(data, EXTENSIONS[kind])
    try:
        items = read_items(path)
        raw = read_items(path, raw=True)
        by_content = read_items(path, id_by="content")
    finally:
        path.unlink()
    assert len(by_content) == len(items)
    # raw mode: one record per non-blank line, whatever the bytes
    assert len(raw) == _non_blank_lines(data)
    assert all(isinstance(r, dict) and isinstance(r["text"], str) for r in raw)
    if kind in ("text", "md", "rst"):
        (record,) = items
        if b"\x00" in data[:8192]:  # binary content: refused as one file's error, never text
            assert isinstance(record, BadFile) and "binary" in record.reason
        else:
            assert isinstance(record, dict) and record["metadata"]["bytes"] == len(data)
    elif kind in ("ndjson", "jsonl"):
        # no silent loss: every non-blank line is a record or a bad line
        assert len(items) == _non_blank_lines(data)
    elif kind == "json":
        body = data.removeprefix(b"\xef\xbb\xbf")
        try:
            value = orjson.loads(body)
        except orjson.JSONDecodeError:
            if body.strip():
                assert len(items) == 1 and isinstance(items[0], BadLine)
            return
        expected = len(value) if isinstance(value, list) else 1
        assert len(items) == expected
    elif kind == "csv":
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            assert len(items) == 1 and isinstance(items[0], BadLine)
            return
        rows = [row for row in csv.reader(io.StringIO(text, newline="")) if row]
        # every row after the header comes out, as a record or a bad line
        assert len(items) == max(len(rows) - 1, 0)


@given(st.integers(130_000, 400_000), st.integers(0, 3))
@settings(max_examples=examples(10))
def test_csv_long_field_is_a_record_and_later_rows_survive(size: int, after: int) -> None:
    """A document of more than 128 KiB in one CSV cell (the csv module's default field limit)
    is read, and no row after it is lost (found by fuzzing: `invalid CSV: field larger than
    field limit (131072)` ended the file there)."""
    rows = [["id", "text"], ["big", "x" * size]] + [[f"r{i}", "small"] for i in range(after)]
    path = _write(_csv_text(rows), ".csv")
    try:
        items = read_items(path)
    finally:
        path.unlink()
    assert [r["id"] for r in items] == ["big"] + [f"r{i}" for i in range(after)]  # type: ignore[index]
    assert len(items[0]["text"]) == size  # type: ignore[index]


def test_json_error_message_is_one_line_naming_the_bad_line(tmp_path: Path) -> None:
    """Regression (fuzzing): a multi-line .json with a syntax error quoted the start of the
    file, newlines included, so the error took several lines on stderr."""
    path = tmp_path / "docs.json"
    path.write_bytes(b'[\n  {"id": "a"},\n  {"id": "b",}\n]\n')
    (bad,) = read_items(path)
    assert isinstance(bad, BadLine)
    assert bad.line == 3 and "\n" not in bad.message()
    assert '{"id": "b",}' in bad.reason


def test_json_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """A .json saved with a UTF-8 BOM (Windows editors) is read as the CSV reader reads one."""
    path = tmp_path / "docs.json"
    path.write_bytes(b'\xef\xbb\xbf[{"id": "a", "text": "hello"}]')
    assert read_items(path) == [{"id": "a", "text": "hello"}]


# -- the real command --------------------------------------------------------------------------


@given(st.sampled_from(sorted(EXTENSIONS)).flatmap(lambda k: st.tuples(st.just(k), file_bytes[k])))
@settings(max_examples=examples(12))
def test_sage_source_exits_0_or_65_with_one_line(case: tuple[str, bytes]) -> None:
    kind, data = case
    with tempfile.TemporaryDirectory(prefix="fuzz-source-") as tmp:
        path = Path(tmp) / f"input{EXTENSIONS[kind]}"
        path.write_bytes(data)
        expected = read_items(path)
        failed = run_sage("source", str(path), timeout=60)
        emitted = run_sage("source", "--on-error", "emit", str(path), timeout=60)
    err = failed.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err and "SAGE_DEBUG" not in err, err
    bad = [i for i in expected if isinstance(i, BadLine)]
    if bad:
        assert failed.returncode == 65, err
        assert err.startswith(f"sage source: error: {path}:") and err.count("\n") == 1, err
    else:
        assert failed.returncode == 0 and err == "", err
        assert len(parse_ndjson(failed.stdout)) == len(expected)
    # --on-error emit: nothing lost, one output line per record or bad line
    assert emitted.returncode == 0, emitted.stderr
    out = parse_ndjson(emitted.stdout)
    assert len(out) == len(expected)
    errors = [r["_error"] for r in out if isinstance(r.get("_error"), dict)]
    assert sum(1 for e in errors if e.get("origin") == str(path)) == len(bad)


def test_csv_blank_lines_before_the_header_are_skipped(tmp_path: Path) -> None:
    """Regression (fuzzing, input b"\\n\\x00"): a CSV starting with a blank line took the blank
    line as an empty header, so every row became `row has N fields, the header has 0`."""
    path = tmp_path / "rows.csv"
    path.write_bytes(b"\r\n\nid,text\n\na,hello\nb\n")
    assert read_items(path) == [
        {"id": "a", "text": "hello"},
        {"id": "b", "text": None},
    ]


def test_the_atheris_harness_takes_its_seeds() -> None:
    """tests/fuzz/harness/fuzz_source.py (run by `make fuzz`) passes its own seed corpus."""
    from tests.fuzz.harness import fuzz_source

    assert fuzz_source.SEEDS
    for seed in fuzz_source.SEEDS:
        fuzz_source.TestOneInput(seed)
