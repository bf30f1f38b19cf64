import os
import select
import subprocess
import time

import orjson

from tests.conftest import clean_env, parse_ndjson, sage_argv


def test_merge_files(cli, tmp_path):
    (tmp_path / "a.ndjson").write_text('{"a": 1}\n')
    (tmp_path / "b.ndjson").write_text('{"b": 1}\n')
    result = cli("merge", str(tmp_path / "a.ndjson"), str(tmp_path / "b.ndjson"), "--tag", "src")
    assert result.exit_code == 0
    out = sorted(parse_ndjson(result.stdout), key=lambda r: r["src"])
    assert out == [
        {"a": 1, "src": str(tmp_path / "a.ndjson")},
        {"b": 1, "src": str(tmp_path / "b.ndjson")},
    ]


def test_merge_bad_line_exit_65_with_file_line(cli, tmp_path):
    (tmp_path / "a.ndjson").write_text('{"a": 1}\nnope\n')
    result = cli("merge", str(tmp_path / "a.ndjson"))
    assert result.exit_code == 65
    assert f"{tmp_path}/a.ndjson:2: invalid JSON" in result.stderr


def test_merge_missing_input_exit_2(cli, tmp_path):
    result = cli("merge", str(tmp_path / "nope.ndjson"))
    assert result.exit_code == 2 and "nope.ndjson: no such file" in result.stderr


def _line(proc, timeout=10.0):
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "no output in time"
    return orjson.loads(proc.stdout.readline())


def test_merge_two_fifos_written_at_different_times(tmp_path):
    f1, f2 = tmp_path / "one", tmp_path / "two"
    os.mkfifo(f1)
    os.mkfifo(f2)
    proc = subprocess.Popen(
        sage_argv("merge", str(f1), str(f2)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )
    try:
        w1 = open(f1, "wb", buffering=0)  # noqa: SIM115
        w2 = open(f2, "wb", buffering=0)  # noqa: SIM115
        w2.write(b'{"n": "two-1"}\n')
        assert _line(proc) == {"n": "two-1", "_source": str(f2)}
        time.sleep(0.3)
        w1.write(b'{"n": "one-1"}\n')
        assert _line(proc) == {"n": "one-1", "_source": str(f1)}
        w2.write(b'{"n": "two-2"}\n')
        assert _line(proc) == {"n": "two-2", "_source": str(f2)}
        w1.close()
        w2.write(b'{"n": "two-3"}\n')  # one input ended, the other goes on
        assert _line(proc)["n"] == "two-3"
        w2.close()
        rest, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert rest == b""
