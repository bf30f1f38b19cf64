import subprocess
import time

from tests.conftest import clean_env, ndjson, parse_ndjson, sage_argv


def test_head_passes_first_n(cli):
    result = cli("head", "2", input=ndjson([{"i": i} for i in range(5)]))
    assert result.exit_code == 0
    assert parse_ndjson(result.stdout) == [{"i": 0}, {"i": 1}]


def test_head_default_is_ten(cli):
    result = cli("head", input=ndjson([{"i": i} for i in range(20)]))
    assert len(parse_ndjson(result.stdout)) == 10


def test_head_stops_reading_an_endless_pipe():
    t0 = time.monotonic()
    yes = subprocess.Popen(["yes", '{"a":1}'], stdout=subprocess.PIPE)
    try:
        out = subprocess.run(
            sage_argv("head", "3"),
            stdin=yes.stdout,
            capture_output=True,
            env=clean_env(),
            timeout=20,
        )
    finally:
        yes.stdout.close()
        yes.kill()
        yes.wait()
    assert out.returncode == 0, out.stderr
    assert parse_ndjson(out.stdout) == [{"a": 1}] * 3
    assert out.stderr == b""
    assert time.monotonic() - t0 < 10


def test_head_bad_line_after_n_is_never_read(cli):
    result = cli("head", "1", input=b'{"a":1}\nnot json\n')
    assert result.exit_code == 0 and parse_ndjson(result.stdout) == [{"a": 1}]
