"""The Ray engine (sage_cli/execution/ray.py) on a real two-node Ray cluster on this machine.

One cluster per module (tests/fixtures/ray_cluster.py): a head node plus a second node with its
own resources, both on 127.0.0.1, owned by the module and stopped when it ends (never `ray stop`). Each pipeline runs
in its own driver process, as `sage run --engine ray --address HOST:PORT` would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import ROOT, clean_env, ndjson, parse_ndjson
from tests.fixtures.ray_cluster import SESSIONS, ray_cluster

pytestmark = pytest.mark.slow


#: a driver process: stages as JSON in argv[1], the address in argv[2], replicas after
DRIVER = """
import json, sys
from sage_cli.execution.ray import run_ray_pipeline
sys.exit(run_ray_pipeline(json.loads(sys.argv[1]), address=sys.argv[2] or None,
                          replicas=sys.argv[3:] or None))
"""

DATAFLOW = [
    ["sage", "map", 'r | {"n": r["id"] * 3, "text": r["text"].upper()}'],
    ["sage", "filter", 'r["n"] % 2 == 0'],
    ["sage", "map", '{"id": r["id"], "k": r["text"][:2], "n": r["n"] + 1}'],
]


def ray_env() -> dict[str, str]:
    # No token auth between the local nodes (Ray 2.5x turns it on when ~/.ray/auth_token
    # exists), no usage stats, and quick detection of a lost node.
    return clean_env(
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_health_check_period_ms="500",
        RAY_health_check_failure_threshold="4",
        RAY_health_check_initial_delay_ms="1000",
    )


@pytest.fixture(scope="module")
def cluster():
    with ray_cluster(ray_env()) as address:
        yield address


def run_on_ray(stages, address, data: bytes, *replicas: str, timeout: float = 300):
    return subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(stages), address, *replicas],
        input=data,
        capture_output=True,
        env=ray_env(),
        cwd=ROOT,
        timeout=timeout,
    )


def run_local(stages, data: bytes) -> subprocess.CompletedProcess:
    sage = f"{sys.executable} -m sage_cli"
    import shlex

    line = " | ".join(sage + " " + " ".join(shlex.quote(w) for w in argv[1:]) for argv in stages)
    return subprocess.run(
        ["bash", "-o", "pipefail", "-c", line],
        input=data,
        capture_output=True,
        env=clean_env(),
        cwd=ROOT,
        timeout=300,
    )


def records(n: int) -> bytes:
    return ndjson([{"id": i, "text": f"record {i}"} for i in range(n)])


def test_dataflow_100k_records_same_as_local(cluster):
    data = records(100_000)
    ray_result = run_on_ray(DATAFLOW, cluster, data, "1=2", "filter=2", "3-map=1")
    assert ray_result.returncode == 0, ray_result.stderr.decode()[-2000:]
    local = run_local(DATAFLOW, data)
    assert local.returncode == 0, local.stderr
    assert ray_result.stdout == local.stdout  # same records, same order
    assert len(parse_ndjson(ray_result.stdout)) == 50_000


def test_stateful_stage_and_error_policy_match_local(cluster):
    stages = [
        ["sage", "map", '1 if r["id"] % 100 == 7 else r', "--on-error", "emit"],
        ["sage", "head", "250"],
        ["sage", "map", 'r | {"seen": True}'],
    ]
    data = records(5000)
    ray_result = run_on_ray(stages, cluster, data)
    local = run_local(stages, data)
    assert ray_result.returncode == local.returncode == 0, ray_result.stderr
    assert ray_result.stdout == local.stdout
    out = parse_ndjson(ray_result.stdout)
    errors = [r for r in out if "_error" in r]  # pass through head uncounted, untouched
    assert len(out) == 253 and len(errors) == 3 and not any("seen" in r for r in errors)


def test_fail_mode_stops_with_the_local_message_and_code(cluster):
    stages = [["sage", "map", 'r | {"x": 1 / (r["id"] - 300)}', "--batch-size", "64"]]
    data = records(2000)
    ray_result = run_on_ray(stages, cluster, data)
    local = run_local(stages, data)
    assert ray_result.returncode == local.returncode == 65
    assert ray_result.stdout == local.stdout  # the 300 records before the bad one
    assert b"stdin:301" in ray_result.stderr and b"ZeroDivisionError" in ray_result.stderr


def _pgrep(sessions: list[int], pattern: str, *more: str) -> list[int]:
    """Processes of this module's cluster (its nodes' sessions) whose command line matches:
    another checkout's Ray on the machine is never seen, let alone killed."""
    out = subprocess.run(
        ["pgrep", "-s", ",".join(map(str, sessions)), *more, "-f", pattern],
        capture_output=True,
        text=True,
    )
    return [int(p) for p in out.stdout.split()]


def _running_actors(cluster: str) -> list[int]:
    """Actor processes running a batch right now (Ray titles them ray::StageActor.run)."""
    return _pgrep(SESSIONS[cluster], "ray::StageActor.run")


def _kill_when(pick, done: threading.Event, killed: list[int], timeout: float = 120) -> None:
    """Poll until `pick` names a process (it returns None until its condition holds), then
    SIGKILL it; give up when the run is over or the deadline passes (the test then fails on
    an empty `killed`)."""
    deadline = time.monotonic() + timeout
    while not done.is_set() and time.monotonic() < deadline:
        pid = pick()
        if pid:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return
        time.sleep(0.02)


SLOW = [
    ["sage", "map", 'r | {"n": r["id"]}'],
    ["sage", "map", '__import__("time").sleep(0.0001) or r'],
    ["sage", "map", 'r | {"ok": 1}'],
]


def test_an_actor_killed_mid_run_loses_and_repeats_no_record(cluster):
    done = threading.Event()
    killed: list[int] = []
    # an actor in the middle of a batch: that batch (at least) is lost with it
    watcher = threading.Thread(
        target=_kill_when,
        daemon=True,
        args=(lambda: next(iter(_running_actors(cluster)), None), done, killed),
    )
    watcher.start()
    try:
        result = run_on_ray(SLOW, cluster, records(30_000))
    finally:
        done.set()
    assert killed, "no actor was running a batch to kill"
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    out = parse_ndjson(result.stdout)
    assert [r["id"] for r in out] == list(range(30_000))  # every record once, in order
    assert all(r["ok"] == 1 for r in out)
    assert b"replaced 1 lost Ray actor" in result.stderr


def test_a_lost_node_loses_and_repeats_no_record(cluster):
    node2 = SESSIONS[cluster][1]
    raylets = _pgrep([node2], "raylet/raylet .*node2,1")
    assert len(raylets) == 1, raylets
    raylet = raylets[0]

    def pick():
        """node 2's raylet, once the run is going and node 2 holds actors (polled: Ray places
        them a while after the first batches run; only a node that holds actors is a loss)."""
        if not _running_actors(cluster):
            return None
        return raylet if _pgrep([node2], "ray::StageActor", "-P", str(raylet)) else None

    done = threading.Event()
    killed: list[int] = []
    # 7 actors of 0.25 CPU: more than half the head's 2 CPUs, so Ray spreads some to node 2
    watcher = threading.Thread(target=_kill_when, daemon=True, args=(pick, done, killed))
    watcher.start()
    try:
        result = run_on_ray(SLOW, cluster, records(30_000), "2-map=3", "1=2", "3=2")
    finally:
        done.set()
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    out = parse_ndjson(result.stdout)
    assert [r["id"] for r in out] == list(range(30_000))
    assert killed == [raylet], "node 2 held no actor: the loss was not exercised"
    # Whether the engine *replaces* node 2's actors depends on whether it sends them work after
    # the kill (dispatch goes to the least busy actor); the guarantee tested here is the output:
    # every record exactly once, in order. The actor-kill test above asserts the replacement.


def test_replicas_for_a_stateful_stage_is_a_usage_error():
    # planning fails before any cluster is joined
    result = run_on_ray([["sage", "head", "3"]], "", b"", "head=2", timeout=60)
    assert result.returncode == 2
    assert b"exactly 1 actor" in result.stderr
    result = run_on_ray([["sage", "map", "r"], ["jq", "."]], "", b"", timeout=60)
    assert result.returncode == 2 and b"only sage stages" in result.stderr


def test_unbounded_stdin_streams_through_ray(cluster):
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, json.dumps(DATAFLOW[:1]), cluster],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ray_env(),
        cwd=ROOT,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b'{"id": 1, "text": "ab"}\n')
        proc.stdin.flush()
        line = proc.stdout.readline()  # comes out while stdin is still open
        assert json.loads(line) == {"id": 1, "text": "AB", "n": 3}
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()


DOCS = [
    ("pass", "The pass statement is a null operation: when it is executed, nothing happens."),
    ("break", "The break statement terminates the nearest enclosing for or while loop."),
    ("lambda", "Lambda expressions are used to create small anonymous functions."),
    ("continue", "The continue statement goes on with the next cycle of the enclosing loop."),
    ("return", "The return statement leaves the current function call with a value or None."),
    ("import", "The import statement finds a module, loads and initializes it, binds names."),
]


@pytest.mark.model
def test_rag_pipeline_on_ray_matches_local(cluster, tmp_path):
    """retrieve | prompt | generate with the real models: same answers from both engines."""
    docs = ndjson([{"id": i, "text": t} for i, t in DOCS])
    index = tmp_path / "idx"
    build = run_local(
        [["sage", "embed", "--no-cache"], ["sage", "index", "build", str(index)]], docs
    )
    assert build.returncode == 0, build.stderr
    questions = (ROOT / "scripts" / "rag_questions.ndjson").read_bytes().splitlines(True)[:4]
    stages = [
        ["sage", "retrieve", "--index", str(index), "-k", "2"],
        ["sage", "prompt", "--template", "qa"],
        ["sage", "generate", "--max-tokens", "24", "--no-cache"],
    ]
    data = b"".join(questions)
    ray_result = run_on_ray(stages, cluster, data)
    local = run_local(stages, data)
    assert ray_result.returncode == local.returncode == 0, ray_result.stderr.decode()[-2000:]
    ray_out, local_out = parse_ndjson(ray_result.stdout), parse_ndjson(local.stdout)
    for r in ray_out + local_out:
        r["usage"].pop("seconds")  # wall time differs, nothing else may
    assert ray_out == local_out and len(ray_out) == 4
    assert all(r["answer"] and r["docs"] for r in ray_out)


TRACER = """
import json, sys
from sage_cli.execution.ray import run_ray_pipeline
sys.exit(run_ray_pipeline(json.loads(sys.argv[1]), address=sys.argv[2], trace_dir=sys.argv[3]))
"""


def test_ray_run_writes_stage_traces_sage_trace_reads(cluster, tmp_path):
    from sage_cli.run.directory import read_events, stage_figures

    stages = [["sage", "map", 'r | {"n": 1}'], ["sage", "filter", 'r["id"] % 4 == 0']]
    result = subprocess.run(
        [sys.executable, "-c", TRACER, json.dumps(stages), cluster, str(tmp_path)],
        input=records(2000),
        capture_output=True,
        env=ray_env(),
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "1-map.trace.ndjson",
        "2-filter.trace.ndjson",
    ]
    first = read_events(tmp_path / "1-map.trace.ndjson")
    second = stage_figures(read_events(tmp_path / "2-filter.trace.ndjson"))
    assert [e["ev"] for e in first][0] == "start" and first[-1]["ev"] == "stop"
    assert first[-1]["status"] == 0
    assert stage_figures(first)["records_in"] == 2000
    assert second["records_in"] == 2000 and second["records_out"] == 500
    assert second["latency_ms"]["p50"] is not None
