"""Fuzzing the NDJSON reader (sage_cli.cli.io.RecordReader, operators.ndjson.complete_lines): any
bytes in give records or a clean data error (exit 65, one line, `stdin:LINE`), never a
traceback or a hang. The atheris harness tests/fuzz/harness/fuzz_ndjson.py checks the same
invariants coverage-guided; here hypothesis drives them, plus the whole `sage map r` command.
"""

from __future__ import annotations

import subprocess

import orjson
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sage_cli.operators.ndjson import (
    LineTooLong,
    complete_lines,
    describe_json_error,
    parse_line,
    printable,
)
from tests.conftest import Cli, clean_env, run_sage, sage_argv
from tests.fuzz.conftest import examples
from tests.fuzz.harness.fuzz_ndjson import check, chunked
from tests.fuzz.strategies import json_values

# -- strategies --------------------------------------------------------------------------------

records = st.dictionaries(st.text(max_size=8), json_values(), max_size=4)
#: bytes that look like NDJSON often enough to reach the parser's interesting corners
ndjsonish = st.lists(
    st.sampled_from(
        [
            b"{",
            b"}",
            b"[",
            b"]",
            b'"',
            b":",
            b",",
            b"\n",
            b"\r",
            b" ",
            b"\\",
            b"u",
            b"0",
            b"1",
            b"-",
            b"e",
            b".",
            b"null",
            b"true",
            b'"_error"',
            b"\xff",
            b"\xc3",
            b"\xa9",
            b"\x00",
        ]
    ),
    max_size=60,
).map(b"".join)
streams = st.binary(max_size=400) | ndjsonish
#: typer's CliRunner over the whole app (no fixture: hypothesis reuses it across examples)
CLI = Cli()


def stream_of(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)


def is_blank(line: bytes) -> bool:
    return not line.strip()


def first_error_line(lines: list[bytes]) -> int | None:
    for n, line in enumerate(lines, 1):
        if not is_blank(line) and isinstance(parse_line(line), str):
            return n
    return None


def assert_one_error_line(stderr: str, line: int) -> None:
    assert "Traceback" not in stderr
    assert stderr.count("\n") == 1 and stderr.endswith("\n"), repr(stderr)
    assert stderr.startswith(f"sage map: error: stdin:{line}: "), repr(stderr)
    assert printable(stderr[:-1]) == stderr[:-1], f"control character in {stderr!r}"


# -- the reader, in process --------------------------------------------------------------------


@given(data=streams, size=st.integers(min_value=1, max_value=70))
@example(data=b'{"a":1}\r\nfoo\rbar\n', size=3)
@example(data=b"\x1b[2J\x1b]0;pwned\x07\n", size=64)
def test_reader_accounts_for_every_line(data, size):
    check(data, size)


@given(st.lists(records, max_size=5), st.integers(min_value=1, max_value=70))
def test_valid_records_come_back_unchanged(recs, size):
    data = stream_of([orjson.dumps(r) for r in recs])
    check(data, size)


def test_regression_control_characters_are_escaped_in_the_excerpt():
    """Found by the fuzzer: a bad line's excerpt was quoted raw, so `\\r` or an ANSI escape in
    input data broke the one-line error (or drove the terminal)."""
    reason = parse_line(b"xfoo\rbar\x1b[2J\xe2\x80\xa8")
    assert reason == (
        "invalid JSON (unexpected character, expected a JSON value): xfoo\\x0dbar\\x1b[2J\u2028"
    )
    assert describe_json_error(b"\x85", ValueError("x")).startswith("invalid UTF-8 at byte 0")


# -- the whole command ------------------------------------------------------------------------


@settings(max_examples=examples(40))
@given(
    st.lists(
        st.one_of(records.map(orjson.dumps), st.binary(max_size=30), ndjsonish),
        max_size=8,
    )
)
@example([b'{"id": 1}', b"foo\rbar"])
@example([b'{"id": 1}', b"   ", b'{"_error": {"line": 2}}', b"[1]"])
def test_map_stops_at_the_first_bad_line_with_one_line(lines):
    lines = [line.replace(b"\n", b" ") for line in lines]
    result = CLI("map", "r", input=stream_of(lines))
    bad = first_error_line(lines)
    good_before = [
        orjson.loads(line) for line in lines[: (bad or len(lines) + 1) - 1] if not is_blank(line)
    ]
    if bad is None:
        assert result.exit_code == 0, result.stderr
        assert result.stderr == ""
    else:
        assert result.exit_code == 65, (result.exit_code, result.stderr)
        assert_one_error_line(result.stderr, bad)
    assert [orjson.loads(x) for x in result.stdout_bytes.splitlines()] == good_before


@settings(max_examples=examples(40))
@given(st.lists(st.one_of(records.map(orjson.dumps), st.binary(max_size=30)), max_size=8))
def test_map_emit_turns_each_bad_line_into_an_error_record(lines):
    lines = [line.replace(b"\n", b" ") for line in lines]
    result = CLI("map", "r", "--on-error", "emit", input=stream_of(lines))
    assert result.exit_code == 0, result.stderr
    out = [orjson.loads(x) for x in result.stdout_bytes.splitlines()]
    kept = [(n, line) for n, line in enumerate(lines, 1) if not is_blank(line)]
    assert len(out) == len(kept)
    for (n, line), got in zip(kept, out, strict=True):
        parsed = parse_line(line)
        if isinstance(parsed, str):
            assert got["_error"]["line"] == n and got["_error"]["origin"] == "stdin"
            assert got["_error"]["error"] == parsed
            assert got["_error"]["raw"] == line.decode("utf-8", errors="replace")
        else:
            assert got == parsed


@settings(max_examples=examples(5))
@given(streams)
@example(b'{"a": 1}\n\xff\n')
def test_real_process_any_bytes_exit_0_or_65_never_a_traceback(data):
    result = run_sage("map", "r", input=data, timeout=30)  # a hang fails with TimeoutExpired
    stderr = result.stderr.decode()
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()
    bad = first_error_line(lines)
    if bad is None:
        assert result.returncode == 0, stderr
        assert stderr == ""
    else:
        assert result.returncode == 65, (result.returncode, stderr)
        assert_one_error_line(stderr, bad)


# -- `_error` records pass through, however their key is spelled ---------------------------------


def spell(key: str, escaped: list[bool]) -> bytes:
    """`key` as a JSON string with the characters marked in `escaped` written as \\uXXXX."""
    chars = [f"\\u{ord(c):04x}" if esc else c for c, esc in zip(key, escaped, strict=False)]
    return ('"' + "".join(chars) + key[len(escaped) :] + '"').encode()


@settings(max_examples=examples(40))
@given(
    st.lists(
        st.tuples(records, st.none() | st.lists(st.booleans(), min_size=6, max_size=6)),
        min_size=1,
        max_size=5,
    )
)
@example([({"a": 1}, [False, False, False, False, False, True])])
def test_error_records_pass_through_map_untouched(rows):
    lines, want = [], []
    for record, escaped in rows:
        record = {k: v for k, v in record.items() if k != "_error"}
        if escaped is None:
            lines.append(orjson.dumps(record))
            want.append({"mapped": True})
            continue
        body = orjson.dumps(record)[1:]  # the record's fields after its `{`
        sep = b"" if body == b"}" else b","
        lines.append(b"{" + spell("_error", escaped) + b':{"line":1}' + sep + body)
        want.append({"_error": {"line": 1}, **record})
    result = CLI("map", '{"mapped": True}', input=stream_of(lines))
    assert result.exit_code == 0, result.stderr
    assert [orjson.loads(x) for x in result.stdout_bytes.splitlines()] == want


def test_regression_an_escaped_error_key_is_an_error_record():
    """Found reviewing the reader for these properties: its fast path looked for `error"` to spot
    `_error` records, so `{"_erro\\u0072": ...}` alone in a block was processed by the operator
    instead of passing through untouched."""
    result = CLI("map", '{"b": 2}', input=b'{"_erro\\u0072": {"x": 1}, "a": 1}\n')
    assert result.exit_code == 0, result.stderr
    assert orjson.loads(result.stdout_bytes) == {"_error": {"x": 1}, "a": 1}


@settings(max_examples=examples(3))
@given(
    st.lists(records, min_size=1, max_size=20),
    st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=8),
)
def test_real_pipe_written_in_pieces_gives_every_record_once(recs, cuts):
    """A pipe delivers lines in arbitrary pieces: cut the stream at random places, flush each
    piece, and every record comes out once, in order."""
    data = stream_of([orjson.dumps(r) for r in recs])
    proc = subprocess.Popen(
        sage_argv("map", "r"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )
    pos = 0
    for i in range(len(data)):
        if pos >= len(data):
            break
        n = cuts[i % len(cuts)]
        proc.stdin.write(data[pos : pos + n])
        proc.stdin.flush()
        pos += n
    out, err = proc.communicate(timeout=60)  # closes stdin; a hang fails with TimeoutExpired
    assert proc.returncode == 0, err
    assert [orjson.loads(x) for x in out.splitlines()] == recs


# -- bounded memory: a line has a maximum length --------------------------------------------------


@given(
    st.binary(max_size=300) | ndjsonish,
    st.integers(min_value=1, max_value=40),
    st.integers(min_value=0, max_value=50),
)
def test_only_a_line_longer_than_the_limit_stops_the_reader(data, size, limit):
    lines = data.split(b"\n")
    try:
        heads = list(complete_lines(chunked(data, size), max_line=limit))
    except LineTooLong as exc:
        assert max(map(len, lines)) > limit
        assert str(exc).startswith("line longer than ")
        return
    # no line too long, or a longer one that arrived whole inside one chunk with its newline
    assert b"\n".join(heads) == (data[:-1] if data.endswith(b"\n") else data)


def test_regression_endless_line_is_a_data_error_not_unbounded_memory():
    """`sage map r < /dev/zero` (or a binary file with no newline) held the growing line in
    memory until the process was killed; past MAX_LINE_BYTES (256 MiB) it is now exit 65."""
    with open("/dev/zero", "rb") as zero:
        result = subprocess.run(
            sage_argv("map", "r"), stdin=zero, capture_output=True, env=clean_env(), timeout=60
        )
    assert result.returncode == 65
    assert result.stderr == (
        b"sage map: error: stdin:1: line longer than 256 MiB with no newline; is this NDJSON?\n"
    )
    assert result.stdout == b""
