import signal
import subprocess

import orjson

from tests.conftest import clean_env, ndjson, parse_ndjson, run_sage, sage_argv
from tests.readiness import pipe_pending, wait_until

RECS = [{"id": "a", "text": "hello"}, {"id": "b", "n": 1}]


def test_sink_passes_ndjson_through_when_not_a_terminal(cli):
    result = cli("sink", input=ndjson(RECS))
    assert result.exit_code == 0
    assert parse_ndjson(result.stdout) == RECS


def test_sink_as_last_stage_of_a_real_pipe_loses_nothing():
    recs = [{"i": i, "text": "x" * 50} for i in range(20000)]
    result = run_sage("sink", input=ndjson(recs))
    assert result.returncode == 0 and result.stderr == b""
    assert parse_ndjson(result.stdout) == recs


def test_sink_to_file_in_each_format(cli, tmp_path):
    for fmt in ("ndjson", "json", "csv", "md"):
        dest = tmp_path / f"out.{fmt}"
        result = cli("sink", "--to", str(dest), "--format", fmt, input=ndjson(RECS))
        assert result.exit_code == 0, result.stderr
        assert result.stdout == ""
        data = dest.read_text()
        if fmt == "ndjson":
            assert parse_ndjson(data) == RECS
        elif fmt == "json":
            assert orjson.loads(data) == RECS
        elif fmt == "csv":
            assert data == "id,text,n\na,hello,\nb,,1\n"
        else:
            assert data.splitlines()[0] == "| id | text | n |" and "| b |  | 1 |" in data


def test_sink_format_to_stdout(cli):
    result = cli("sink", "--format", "csv", input=ndjson(RECS))
    assert result.exit_code == 0 and result.stdout == "id,text,n\na,hello,\nb,,1\n"


def test_sink_bad_input_keeps_the_old_file(cli, tmp_path):
    dest = tmp_path / "out.ndjson"
    dest.write_text('{"old": true}\n')
    result = cli("sink", "--to", str(dest), input=b'{"a": 1}\nnot json\n')
    assert result.exit_code == 65 and "stdin:2" in result.stderr
    assert dest.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.ndjson"]


def test_sink_pretty_renders_fields(cli):
    result = cli("sink", "--pretty", input=ndjson([{"id": "a", "text": "hello world"}]))
    assert result.exit_code == 0
    assert "id a" in result.stdout and "text hello world" in result.stdout
    assert not result.stdout.lstrip().startswith("{")


def test_sink_interrupted_keeps_the_old_file(tmp_path):
    dest = tmp_path / "out.ndjson"
    dest.write_text("old\n")
    proc = subprocess.Popen(
        sage_argv("sink", "--to", str(dest)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )
    proc.stdin.write(b'{"a": 1}\n')
    proc.stdin.flush()
    # ready: sink has opened its temporary file and read the record (the pipe is empty)
    wait_until(
        lambda: (
            [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
            and pipe_pending(proc.stdin.fileno()) == 0
        ),
        "sink to open its temporary file and read the record",
    )
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 130, err
    assert dest.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.ndjson"]


def test_sink_unknown_format_is_usage_error(cli):
    result = cli("sink", "--format", "xml", input=b"")
    assert result.exit_code == 2 and "--format" in result.stderr
