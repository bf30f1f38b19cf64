"""The NDJSON reader against the whole JSONTestSuite parsing corpus (DESIGN §7).

`tests/data/jsontestsuite/test_parsing/` (its README maps the corpus to NDJSON): a one-line
`y_` file holding an object is a valid record; a `y_` file holding any other value and every `n_`
file is a data error (exit 65 under `--on-error fail`); `i_` files may go either way; no file may
produce a traceback or a hang.

Two cases the mapping does not reach, decided by DESIGN §3 and checked as such:
- an empty file and a file holding one space have no NDJSON line at all (blank lines are
  skipped): empty output, exit 0;
- a file with a newline inside its JSON text (`y_object_with_newlines.json`) is several NDJSON
  lines, none a complete JSON text: a data error at line 1.

Each file runs in-process through typer's CliRunner (fast: the whole corpus in a few seconds)
under an alarm that turns a hang into a failure; one real subprocess then reads every file
as a FILE argument, to check `FILE:LINE` origins over real file descriptors.
"""

from __future__ import annotations

import signal
from pathlib import Path

import orjson
import pytest

from tests.conftest import DATA, parse_ndjson, run_sage

CORPUS = DATA / "jsontestsuite" / "test_parsing"
FILES = sorted(CORPUS.glob("*.json"))
HANG_SECONDS = 10


def is_blank(data: bytes) -> bool:
    return not data.strip(b" \t\r\n")


def is_multiline(data: bytes) -> bool:
    return b"\n" in data.rstrip(b"\n")


def expected(path: Path) -> str:
    """'record', 'error', 'empty' or 'either' for one corpus file read as NDJSON."""
    data = path.read_bytes()
    if is_blank(data):
        return "empty"
    if is_multiline(data):
        return "error"
    kind = path.name[0]
    if kind == "i":
        return "either"
    if kind == "n":
        return "error"
    value = orjson.loads(data)  # y_: orjson must accept every one of them
    return "record" if isinstance(value, dict) else "error"


@pytest.fixture
def alarm():
    """Fail a test that runs longer than HANG_SECONDS instead of hanging the suite."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"no answer within {HANG_SECONDS}s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(HANG_SECONDS)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_corpus_is_there():
    assert len(FILES) >= 300, f"JSONTestSuite corpus missing or incomplete at {CORPUS}"
    kinds = {p.name[0] for p in FILES}
    assert kinds == {"y", "n", "i"}


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_file_on_stdin(cli, alarm, path):
    data = path.read_bytes()
    want = expected(path)
    result = cli("map", "r", "--on-error", "fail", input=data)
    assert "Traceback" not in result.stderr
    if want == "either":
        assert result.exit_code in (0, 65), result.stderr
        want = "record" if result.exit_code == 0 else "error"
    if want == "record":
        assert result.exit_code == 0, result.stderr
        out = result.stdout_bytes
        assert out.endswith(b"\n") and out.count(b"\n") == 1
        assert orjson.loads(out) == orjson.loads(data)
        assert result.stderr == ""
    elif want == "empty":
        assert result.exit_code == 0, result.stderr
        assert result.stdout == "" and result.stderr == ""
    else:
        assert result.exit_code == 65, (result.exit_code, result.stderr)
        assert result.stdout == ""
        assert result.stderr.startswith("sage map: error: stdin:1: ")
        assert result.stderr.count("\n") == 1
        assert len(result.stderr) < 400, "the error line quotes only an excerpt"


def test_whole_corpus_as_file_arguments_in_one_process():
    """Every file as a FILE argument to one real `sage map`, bad lines emitted as _error."""
    result = run_sage("map", "r", "--on-error", "emit", *map(str, FILES), timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    out = parse_ndjson(result.stdout)
    records = iter(out)
    # records carry no origin; error records do. Walk the files in order to pair them up.
    for path in FILES:
        want = expected(path)
        lines = [ln for ln in path.read_bytes().split(b"\n") if ln.strip(b" \t\r\n")]
        got = [next(records) for _ in lines]
        if want == "either":
            want = "error" if any("_error" in r for r in got) else "record"
        if want == "record":
            assert got == [orjson.loads(path.read_bytes())], path.name
        elif want == "error":
            assert got and all("_error" in r for r in got), (path.name, got)
            assert got[0]["_error"]["origin"] == str(path)
            assert got[0]["_error"]["line"] == 1
        else:
            assert got == [], path.name
    assert next(records, None) is None, "more output records than input lines"
