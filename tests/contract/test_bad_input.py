"""Bad input, each case with a one-line error, a documented exit code (README: 2 for an input
file that is missing or cannot be read, 65 for bad data) and nothing already written lost.

All through real subprocesses (`sage map r`, the plainest operator: every other command shares
its reader and driver).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import orjson
import pytest

from tests.conftest import ROOT, clean_env, ndjson, parse_ndjson, run_sage, sage_argv

GOOD = ndjson([{"id": 1, "text": "first"}, {"id": 2, "text": "second"}])
BIG = 50 * 1024 * 1024


def one_line(stderr: bytes) -> str:
    text = stderr.decode()
    assert "Traceback" not in text
    assert text.count("\n") == 1 and text.endswith("\n"), f"not one line: {text[:300]!r}"
    assert text.startswith("sage map: error: ")
    return text


def assert_good_written(stdout: bytes) -> None:
    assert parse_ndjson(stdout) == [{"id": 1, "text": "first"}, {"id": 2, "text": "second"}]


# -- bad data: exit 65 -------------------------------------------------------------------------


def test_invalid_json_names_the_line_after_writing_what_came_before():
    result = run_sage("map", "r", input=GOOD + b'{"id": 3, "text": "no end}\n{"id": 4}\n')
    assert result.returncode == 65
    err = one_line(result.stderr)
    assert "stdin:3: invalid JSON" in err and "--on-error" in err
    assert_good_written(result.stdout)


def test_invalid_json_in_a_file_names_file_and_line(tmp_path):
    src = tmp_path / "in.ndjson"
    src.write_bytes(GOOD + b"{oops}\n")
    result = run_sage("map", "r", str(src))
    assert result.returncode == 65
    assert f"{src}:3: invalid JSON" in one_line(result.stderr)
    assert_good_written(result.stdout)


def test_plain_text_where_records_were_expected_says_how_to_read_text(tmp_path):
    result = run_sage("map", "r", input=b"How do I decode DER data?\nsecond line\n")
    assert result.returncode == 65
    err = one_line(result.stderr)
    assert "stdin:1: invalid JSON" in err and "put `sage source - -R |` in front" in err
    notes = tmp_path / "my notes.txt"
    notes.write_bytes(b"plain words\n")
    err = one_line(run_sage("map", "r", str(notes)).stderr)
    assert f"read it with `sage source '{notes}' -R`" in err
    # JSON gone wrong, or a bad line after good records, is not plain text: no such advice
    for data in (b"{oops}\n", GOOD + b"plain words\n", b"[1,\n", b"  \x22a\n", b"true\n"):
        err = one_line(run_sage("map", "r", input=data).stderr)
        assert "sage source" not in err, data


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        (b"[1, 2]", "an array"),
        (b'"text"', "a string"),
        (b"42", "a number"),
        (b"-1.5e3", "a number"),
        (b"true", "a boolean"),
        (b"null", "null"),
        (b"[]", "an array"),
    ],
)
def test_array_or_scalar_where_an_object_is_expected(line, kind):
    result = run_sage("map", "r", input=GOOD + line + b"\n")
    assert result.returncode == 65
    assert f"stdin:3: expected a JSON object, got {kind}" in one_line(result.stderr)
    assert_good_written(result.stdout)


def test_invalid_utf8_is_a_data_error():
    bad = b'{"id": 3, "text": "caf\xe9 cr\xe8me"}\n'
    result = run_sage("map", "r", input=GOOD + bad)
    assert result.returncode == 65
    err = one_line(result.stderr)
    assert "stdin:3: invalid UTF-8 at byte 22" in err
    assert_good_written(result.stdout)


def test_invalid_utf8_emitted_as_an_error_record_is_valid_utf8():
    bad = b'{"text": "\xff\xfe"}\n'
    result = run_sage("map", "r", "--on-error", "emit", input=bad + GOOD)
    assert result.returncode == 0, result.stderr
    result.stdout.decode("utf-8")  # output stays UTF-8 whatever came in
    out = parse_ndjson(result.stdout)
    assert out[0]["_error"]["line"] == 1 and "UTF-8" in out[0]["_error"]["error"]
    assert out[1:] == parse_ndjson(GOOD)


def test_a_50mb_valid_line_passes_through(tmp_path):
    big = tmp_path / "big.ndjson"
    record = b'{"id":"big","text":"' + b"x" * BIG + b'"}\n'
    big.write_bytes(GOOD + record + GOOD)
    result = run_sage("map", "r", str(big), timeout=120)
    assert result.returncode == 0, result.stderr[:300]
    assert result.stdout == GOOD + record + GOOD


def test_a_50mb_invalid_line_fails_fast_with_a_short_message(tmp_path):
    big = tmp_path / "big.ndjson"
    big.write_bytes(GOOD + b'{"id":"big","text":"' + b"x" * BIG + b"\n")  # unterminated string
    t0 = time.monotonic()
    result = run_sage("map", "r", str(big), timeout=120)
    elapsed = time.monotonic() - t0
    assert result.returncode == 65
    err = one_line(result.stderr)
    assert f"{big}:3: invalid JSON" in err
    assert len(err) < 300, f"the error quotes {len(err)} bytes: an excerpt only"
    assert_good_written(result.stdout)
    assert elapsed < 15, f"took {elapsed:.1f}s to reject one line"


def test_a_50mb_line_of_garbage_on_stdin_is_rejected(tmp_path):
    result = run_sage("map", "r", input=GOOD + b"\xff" * BIG + b"\n", timeout=120)
    assert result.returncode == 65
    err = one_line(result.stderr)
    assert "stdin:3: invalid UTF-8 at byte 0" in err and len(err) < 300
    assert_good_written(result.stdout)


# -- empty input: exit 0 -----------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"\n", b"\n\n  \n\t\n"])
def test_empty_file_gives_no_output(tmp_path, content):
    empty = tmp_path / "empty.ndjson"
    empty.write_bytes(content)
    result = run_sage("map", "r", str(empty))
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")


def test_empty_stdin_gives_no_output():
    result = run_sage("map", "r", input=b"")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")


def test_empty_file_among_others_is_just_empty(tmp_path):
    (tmp_path / "a.ndjson").write_bytes(GOOD[: GOOD.index(b"\n") + 1])
    (tmp_path / "empty.ndjson").write_bytes(b"")
    (tmp_path / "b.ndjson").write_bytes(GOOD[GOOD.index(b"\n") + 1 :])
    result = run_sage(
        "map", "r", *(str(tmp_path / n) for n in ("a.ndjson", "empty.ndjson", "b.ndjson"))
    )
    assert result.returncode == 0, result.stderr
    assert_good_written(result.stdout)


# -- input files that cannot be read: exit 2 ---------------------------------------------------


def test_missing_file_after_a_good_one(tmp_path):
    good = tmp_path / "good.ndjson"
    good.write_bytes(GOOD)
    missing = tmp_path / "missing.ndjson"
    result = run_sage("map", "r", str(good), str(missing))
    assert result.returncode == 2
    assert f"{missing}: no such file" in one_line(result.stderr)
    assert_good_written(result.stdout)


def test_directory_given_as_input(tmp_path):
    good = tmp_path / "good.ndjson"
    good.write_bytes(GOOD)
    result = run_sage("map", "r", str(good), str(tmp_path))
    assert result.returncode == 2
    err = one_line(result.stderr)
    assert f"{tmp_path}: is a directory" in err and "sage source" in err
    assert_good_written(result.stdout)


def without_privileges() -> list[str] | None:
    """A command prefix under which permission bits apply: none needed for a normal user; for
    root (CI runs as root, and root reads anything) `setpriv` with every capability dropped,
    so root is refused by mode 000 like anyone else. None if neither is possible."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    return [setpriv, "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all"]


@pytest.mark.parametrize("what", ["file", "directory"])
def test_input_without_read_permission(tmp_path, what):
    prefix = without_privileges()
    if prefix is None:
        pytest.skip("running as root without setpriv: permission bits do not stop root")
    good = tmp_path / "good.ndjson"
    good.write_bytes(GOOD)
    locked = tmp_path / "locked"
    if what == "file":
        locked.write_bytes(GOOD)
        target = locked
    else:
        locked.mkdir()
        (locked / "in.ndjson").write_bytes(GOOD)
        target = locked / "in.ndjson"
    locked.chmod(0)
    try:
        result = subprocess.run(
            [*prefix, *sage_argv("map", "r", str(good), str(target))],
            capture_output=True,
            env=clean_env(),
            cwd=ROOT,
            timeout=60,
        )
    finally:
        locked.chmod(0o700)
    assert result.returncode == 2, result.stderr
    assert f"{target}: permission denied" in one_line(result.stderr)
    assert_good_written(result.stdout)


def test_error_output_is_valid_ndjson_up_to_the_failure():
    """Records before a failure are whole lines: the output parses line by line."""
    lines = ndjson([{"id": i, "text": "t" * i} for i in range(5000)])
    result = run_sage("map", "r", input=lines + b"nope\n")
    assert result.returncode == 65
    assert "stdin:5001:" in one_line(result.stderr)
    assert result.stdout == lines
    assert [orjson.loads(x)["id"] for x in result.stdout.splitlines()] == list(range(5000))


@pytest.mark.parametrize("args", [["sink", "--to", "{out}"], ["dedupe", "--key", "a"]])
def test_a_record_nested_past_what_orjson_writes_goes_through(tmp_path, args):
    """JSON allows it and orjson reads 1024 levels but writes only 254: what `sage map r` writes
    (through the standard library) every operator that serialises takes as well."""
    deep = b'{"id":1,"a":' + b"[" * 300 + b"]" * 300 + b"}\n"
    out = tmp_path / "out.ndjson"
    argv = [a.replace("{out}", str(out)) for a in args]
    proc = run_sage(*argv, input=run_sage("map", "r", input=deep).stdout)
    assert proc.returncode == 0, proc.stderr
    assert (out.read_bytes() if "--to" in args else proc.stdout) == deep


# -- closed standard descriptors (`<&-`, `>&-`, `2>&-`, as daemons and some cron setups leave
# them): a one-line reason and exit 1 where the stage needs the descriptor, nothing otherwise


def _with_closed(fd: int, *words: str, path: str) -> subprocess.CompletedProcess[bytes]:
    streams = {0: "stdin", 1: "stdout", 2: "stderr"}
    kwargs: dict = {k: subprocess.PIPE for k in ("stdout", "stderr")}
    kwargs.pop(streams[fd], None)
    return subprocess.run(
        sage_argv("map", *words, path),
        env=clean_env(),
        timeout=60,
        pass_fds=(),
        preexec_fn=lambda: os.close(fd),  # noqa: PLW1509 - closes one descriptor, nothing else
        **kwargs,
    )


def test_closed_descriptors_give_one_line_or_nothing(tmp_path):
    data = tmp_path / "in.ndjson"
    data.write_bytes(GOOD)
    no_stdin = _with_closed(0, "r", path="-")
    assert no_stdin.returncode == 1
    assert "stdin is closed (`<&-`)" in one_line(no_stdin.stderr)
    read_file = _with_closed(0, "r", path=str(data))  # a stage that reads no stdin runs on
    assert read_file.returncode == 0 and parse_ndjson(read_file.stdout) == parse_ndjson(GOOD)
    no_stdout = _with_closed(1, "r", path=str(data))
    assert no_stdout.returncode == 1
    assert "stdout is closed (`>&-`)" in one_line(no_stdout.stderr)
    no_stderr = _with_closed(2, "r", path=str(data))  # it had nothing to say: it runs as usual
    assert no_stderr.returncode == 0 and parse_ndjson(no_stderr.stdout) == parse_ndjson(GOOD)
    failing = _with_closed(2, 'r["missing"]', path=str(data))  # the status still tells
    assert failing.returncode == 65 and failing.stdout == b""
