import select
import subprocess
import time

import orjson

from tests.conftest import clean_env, ndjson, parse_ndjson, sage_argv


def test_window_count_by_key(cli):
    data = [{"u": "a", "v": 1}, {"u": "b", "v": 2}, {"u": "a", "v": 3}]
    result = cli("window", "--size", "2", "--key", "u", "--agg", "sum:v", input=ndjson(data))
    assert result.exit_code == 0, result.stderr
    assert parse_ndjson(result.stdout) == [
        {"id": "window:a:0", "key": "a", "start": 0, "end": 2, "sum_v": 4},
        {"id": "window:b:0", "key": "b", "start": 0, "end": 2, "sum_v": 2},
    ]


def test_window_after_keyby_uses_the_key(cli):
    data = ndjson([{"_key": "x"}, {"_key": "y"}, {"_key": "x"}])
    result = cli("window", "--size", "5", input=data)
    assert [(r["key"], r["count"]) for r in parse_ndjson(result.stdout)] == [("x", 2), ("y", 1)]


def test_window_event_time(cli):
    data = ndjson([{"t": 0, "v": 1}, {"t": 30, "v": 2}, {"t": 65, "v": 4}])
    result = cli("window", "--seconds", "60", "--time-field", "t", "--agg", "max:v", input=data)
    assert parse_ndjson(result.stdout) == [
        {"id": "window:0", "start": 0, "end": 60, "max_v": 2},
        {"id": "window:60", "start": 60, "end": 120, "max_v": 4},
    ]


def test_window_bad_value_names_line(cli):
    result = cli("window", "--size", "2", "--agg", "sum:v", input=ndjson([{"v": 1}, {"v": "x"}]))
    assert (
        result.exit_code == 65 and "stdin:2" in result.stderr and "needs a number" in result.stderr
    )


def test_window_needs_size_or_seconds(cli):
    result = cli("window", input=b"")
    assert result.exit_code == 2 and "--size" in result.stderr


def test_arrival_window_closes_while_stdin_is_idle():
    proc = subprocess.Popen(
        sage_argv("window", "--seconds", "0.5", "--agg", "count"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )
    try:
        proc.stdin.write(b'{"a": 1}\n{"a": 2}\n{"a": 3}\n')
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        assert ready, "the window did not close while input was idle"
        window = orjson.loads(proc.stdout.readline())
        assert window["count"] == 3 and window["end"] - window["start"] == 0.5
        assert window["start"] <= time.time()
        assert proc.poll() is None  # stdin is still open
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
        rest, err = proc.stdout.read(), proc.stderr.read()
    assert proc.returncode == 0, err
    assert rest == b""


def test_a_key_beyond_64_bits_names_its_window_exactly():
    """Found by make fuzz's class of inputs: orjson.dumps refused the key (TypeError, exit 1)."""
    key = 18446744073709551616
    data = b"".join(b'{"k": %d, "t": %d}\n' % (key, t) for t in range(2))
    result = subprocess.run(
        sage_argv("window", "--key", "k", "--size", "2"),
        input=data,
        capture_output=True,
        env=clean_env(),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(
        b'{"id":"window:18446744073709551616:0","key":18446744073709551616'
    )
