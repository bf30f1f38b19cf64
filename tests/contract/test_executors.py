"""One contract for the three executors (issue 11): the same stage run inline (`sage map`), in a
process pool (`sage map --workers 2`) and on Ray actors (`python -m sage_cli.execution.ray` on a
real two-node local cluster) gives the same bytes out, the same error records, the same trace
events and envelope, ticks its windows, and ends on SIGINT/SIGTERM with 130/143.

Ray runs join the module's cluster (tests/scale/test_ray.py's fixture: started on first use);
inline and workers runs never start one.
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys

import orjson
import pytest

from tests.conftest import ROOT, clean_env, ndjson, parse_ndjson
from tests.scale.test_ray import cluster, ray_env  # noqa: F401 - the fixture, used by name

EXECUTORS = ["inline", "workers", "ray"]

pytestmark = pytest.mark.slow


def command(
    executor: str, stage: list[str], request: pytest.FixtureRequest, *extra: str
) -> list[str]:
    """The command line that runs one `sage VERB ...` stage on `executor`."""
    if executor == "ray":
        address = request.getfixturevalue("cluster")
        return [
            sys.executable,
            "-m",
            "sage_cli.execution.ray",
            "--address",
            address,
            *extra,
            shlex.join(stage),
        ]
    argv = [sys.executable, "-m", "sage_cli", *stage[1:]]
    return [*argv, "--workers", "2"] if executor == "workers" else argv


def run(
    executor: str,
    stage: list[str],
    request: pytest.FixtureRequest,
    data: bytes,
    *extra: str,
    **env: str,
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        command(executor, stage, request, *extra),
        input=data,
        capture_output=True,
        env=ray_env() | env if executor == "ray" else clean_env(**env),
        cwd=ROOT,
        timeout=300,
    )


def start(executor: str, stage: list[str], request: pytest.FixtureRequest) -> subprocess.Popen:
    """The stage running on `executor`, its stdin and stdout pipes open."""
    return subprocess.Popen(
        command(executor, stage, request),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ray_env() if executor == "ray" else clean_env(),
        cwd=ROOT,
    )


def mixed_input(n: int) -> bytes:
    """Records, with `_error` records and lines that are not JSON objects among them."""
    lines = []
    for i in range(n):
        if i % 97 == 5:
            lines.append(orjson.dumps({"id": i, "_error": {"stage": "earlier", "error": "x"}}))
        elif i % 131 == 9:
            lines.append(b'{"id": ' + str(i).encode() + b", broken")
        else:
            lines.append(orjson.dumps({"id": i, "text": f"record {i}"}))
    return b"\n".join(lines) + b"\n"


FAILING = ["sage", "map", 'r | {"x": 1 / (r["id"] % 100 - 7)}', "--batch-size", "32"]


@pytest.mark.parametrize("executor", EXECUTORS)
def test_order_error_records_and_pass_through(executor, request, tmp_path):
    dead = tmp_path / "dead.ndjson"
    stage = [*FAILING, "--on-error", "emit", "--errors", str(dead)]
    result = run(executor, stage, request, mixed_input(3000))
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    out = parse_ndjson(result.stdout)
    assert len(out) == 3000  # one out per line in: results, emitted errors, passed-through
    assert [r.get("id") for r in out if "id" in r] == sorted(r["id"] for r in out if "id" in r)
    passed = [r for r in out if r.get("_error", {}).get("stage") == "earlier"]
    assert passed == [
        {"id": i, "_error": {"stage": "earlier", "error": "x"}} for i in range(5, 3000, 97)
    ]
    failed = [r for r in out if r.get("_error", {}).get("stage") == "sage map"]
    bad_lines = [r for r in failed if "raw" in r["_error"]]
    bad_records = [r for r in failed if "raw" not in r["_error"]]
    broken = [i + 1 for i in range(3000) if i % 131 == 9 and i % 97 != 5]
    assert [r["_error"]["line"] for r in bad_lines] == broken
    assert all(r["id"] % 100 == 7 for r in bad_records)
    assert all(
        "ZeroDivisionError" in r["_error"]["error"] or "division" in r["_error"]["error"]
        for r in bad_records
    )
    assert all(r["_error"]["line"] == r["id"] + 1 for r in bad_records)
    expected_dead = len(bad_lines) + len(bad_records)
    assert len(dead.read_bytes().splitlines()) == expected_dead
    if executor != "inline":  # byte for byte what the inline executor writes
        inline = run("inline", stage, request, mixed_input(3000))
        assert result.stdout == inline.stdout


@pytest.mark.parametrize("executor", EXECUTORS)
def test_skip_counts_and_fail_stops_where_inline_stops(executor, request):
    data = ndjson([{"id": i} for i in range(1000)])
    skipped = run(executor, [*FAILING, "--on-error", "skip"], request, data)
    assert skipped.returncode == 0
    assert len(parse_ndjson(skipped.stdout)) == 990
    assert b"sage map: warning: skipped 10 bad record(s)" in skipped.stderr
    failed = run(executor, FAILING, request, data)
    assert failed.returncode == 65
    assert [r["id"] for r in parse_ndjson(failed.stdout)] == list(range(7))  # before the bad one
    assert failed.stderr.decode().strip().splitlines()[-1].startswith("sage map: error: stdin:8:")


@pytest.mark.parametrize("executor", EXECUTORS)
def test_trace_events(executor, request, tmp_path):
    stage = ["sage", "filter", 'r["id"] % 2 == 0', "--batch-size", "100"]
    data = ndjson([{"id": i} for i in range(3000)])
    if executor == "ray":
        result = run(executor, stage, request, data, "--trace-dir", str(tmp_path))
        trace = tmp_path / "1-filter.trace.ndjson"
    else:
        env = {"SAGE_TRACE_DIR": str(tmp_path), "SAGE_TRACE_STAGE": "1-filter"}
        result = run(executor, stage, request, data, **env)
        trace = tmp_path / "1-filter.trace.ndjson"
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    events = parse_ndjson(trace.read_bytes())
    assert events[0]["ev"] == "start" and events[-1]["ev"] == "stop"
    batches = [e for e in events if e["ev"] == "b"]
    assert sum(e["n"] for e in batches) == 3000 and sum(e["o"] for e in batches) == 1500
    assert sorted(i for e in batches for i in e["ids"]) == list(range(3000))
    assert all(e["d"] >= 0 for e in batches)
    stop = events[-1]
    assert (stop["in"], stop["out"], stop["errors"], stop["status"]) == (3000, 1500, 0, 0)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_envelope(executor, request):
    data = ndjson([{"id": i} for i in range(500)] + [{"id": 500, "_error": {"stage": "x"}}])
    result = run(
        executor, ["sage", "map", "r"], request, data, SAGE_ENVELOPE="1", SAGE_RUN_ID="run-1"
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    out = parse_ndjson(result.stdout)
    assert len(out) == 501 and "_sage" not in out[-1]  # an _error record passes untouched
    for r in out[:-1]:
        assert r["_sage"]["run"] == "run-1"
        [entry] = r["_sage"]["stages"]
        assert entry["stage"] == "map" and entry["ms"] >= 0


@pytest.mark.parametrize("executor", EXECUTORS)
def test_window_ticks_while_input_waits(executor, request):
    """An arrival-time window is written when its time is up, before stdin closes."""
    stage = ["sage", "window", "--seconds", "0.5", "--agg", "count"]
    if executor == "workers":  # a window keeps state: refused like Ray's --replicas window=2
        result = run(executor, stage, request, b"")
        assert result.returncode == 2
        assert b"--workers needs a stateless operator" in result.stderr
        return
    proc = start(executor, stage, request)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(ndjson([{"id": i} for i in range(3)]))
        proc.stdin.flush()
        line = proc.stdout.readline()  # while stdin is still open
        assert json.loads(line)["count"] == 3
        proc.stdin.close()
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("executor", EXECUTORS)
def test_signals_end_the_stage_with_130_or_143(executor, sig, request):
    stage = ["sage", "map", 'r | {"n": 1}']
    proc = start(executor, stage, request)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b'{"id": 1}\n')
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline()) == {"id": 1, "n": 1}  # it runs
        proc.send_signal(sig)
        code = proc.wait(timeout=60)
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert code == (130 if sig == signal.SIGINT else 143), err.decode()[-2000:]
    assert b"Traceback" not in err
