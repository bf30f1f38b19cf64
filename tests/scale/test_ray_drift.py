"""`sage run --engine ray` takes the flags a local run takes (issue 11): --trace, --timeout and
--lock reach it, --check predicts what it accepts, and the README's cluster example (an index
built by a script whose last stage is `sage index build`) runs on a real two-node local cluster.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, ndjson, parse_ndjson
from tests.scale.test_ray import cluster, ray_env  # noqa: F401 - the fixture, used by name

pytestmark = pytest.mark.slow

SCRIPT = """#!/usr/bin/env bash
set -euo pipefail
sage map 'r | {"y": r["x"] * 2}' < in.ndjson | sage filter 'r["y"] % 3 == 0' > out.ndjson
"""


def sage_run(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
    bin_dir = str(Path(sys.executable).parent)
    env = ray_env() | {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "sage_cli", "run", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        timeout=timeout,
    )


@pytest.fixture
def address(request: pytest.FixtureRequest) -> str:
    """The module's two-node cluster (tests/scale/test_ray.py), started on first use."""
    return str(request.getfixturevalue("cluster"))


@pytest.fixture
def script(tmp_path: Path) -> Path:
    (tmp_path / "in.ndjson").write_bytes(ndjson([{"id": i, "x": i} for i in range(3000)]))
    (tmp_path / "p.sh").write_text(SCRIPT)
    return tmp_path


def test_trace_batches_and_off_reach_the_ray_stages(address, script):
    ray = ["--engine", "ray", "--address", address, "-q"]
    batches = sage_run(script, *ray, "--trace", "batches", "--run-dir", "b", "p.sh")
    assert batches.returncode == 0, batches.stderr.decode()[-2000:]
    events = parse_ndjson((script / "b" / "stages" / "1-map.trace.ndjson").read_bytes())
    counted = [e for e in events if e["ev"] == "b"]
    assert sum(e["n"] for e in counted) == 3000 and not any("ids" in e for e in counted)
    off = sage_run(script, *ray, "--trace", "off", "--run-dir", "o", "p.sh")
    assert off.returncode == 0, off.stderr.decode()[-2000:]
    assert list((script / "o" / "stages").glob("*.trace.ndjson")) == []
    assert (script / "o" / "summary.json").exists()


def test_timeout_stops_a_ray_run_with_124(address, script):
    slow = SCRIPT.replace("r | {", '__import__("time").sleep(0.01) or r | {')
    (script / "p.sh").write_text(slow)
    started = time.monotonic()
    result = sage_run(script, "--engine", "ray", "--address", address, "--timeout", "8", "p.sh")
    assert result.returncode == 124, result.stderr.decode()[-2000:]
    assert b"timed out after 8s" in result.stderr
    assert time.monotonic() - started < 60  # 3000 records at 10 ms each would take 30 s / 2


def test_lock_refuses_a_second_ray_run(address, script):
    from sage_cli.run.runner import acquire_lock

    cwd = os.getcwd()
    os.chdir(script)
    try:
        held = acquire_lock(Path("p.sh"), [])
    finally:
        os.chdir(cwd)
    try:
        result = sage_run(script, "--engine", "ray", "--address", address, "--lock", "p.sh")
    finally:
        held.close()
    assert result.returncode == 75
    assert b"is already running" in result.stderr
    assert not (script / "out.ndjson").exists()


@pytest.mark.parametrize(
    ("script_text", "replicas", "message"),
    [
        ("sage map r < in.ndjson | sage head 3 > out.ndjson\n", "head=2", "exactly 1 actor"),
        ("sage map r < in.ndjson | sort > out.ndjson\n", "map=1", "only sage stages"),
        ("sage map r < in.ndjson | sage source - > out.ndjson\n", "map=1", "only the first"),
    ],
)
def test_check_refuses_what_the_ray_engine_refuses(
    script, script_text: str, replicas: str, message: str
):
    (script / "p.sh").write_text(script_text)
    ray = ["--engine", "ray", "--replicas", replicas]
    check = sage_run(script, "--check", *ray, "p.sh", timeout=120)
    run = sage_run(script, *ray, "-q", "p.sh", timeout=120)  # refused before joining a cluster
    assert check.returncode == run.returncode == 2, (check.stderr, run.stderr)
    assert message.encode() in check.stderr and message.encode() in run.stderr


@pytest.mark.model
def test_readme_cluster_example_builds_the_index(address, tmp_path):
    """`sage run --engine ray --replicas embed=2 ingest.sh docs/ idx/` (README, Scale out)."""
    work = tmp_path / "examples"
    shutil.copytree(ROOT / "scripts" / "examples", work)
    ray = ["--engine", "ray", "--address", address, "--replicas", "embed=2"]
    check = sage_run(work, "--check", *ray, "ingest.sh", "docs/", "idx/")
    assert check.returncode == 0, check.stderr.decode()[-2000:]
    result = sage_run(work, *ray, "--run-dir", "run", "-q", "ingest.sh", "docs/", "idx/")
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    local = subprocess.run(
        ["bash", "ingest.sh", "docs/", "local-idx/"],
        cwd=work,
        env=ray_env() | {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"},
        capture_output=True,
        timeout=300,
    )
    assert local.returncode == 0, local.stderr.decode()[-2000:]
    import json

    ray_manifest = json.loads((work / "idx" / "manifest.json").read_text())
    local_manifest = json.loads((work / "local-idx" / "manifest.json").read_text())
    assert ray_manifest["count"] == local_manifest["count"] > 0
    assert ray_manifest["model"] == local_manifest["model"]
    summary = json.loads((work / "run" / "summary.json").read_text())
    embed = next(s for s in summary["stages"] if s["name"] == "3-embed")
    build = next(s for s in summary["stages"] if s["name"] == "4-index")
    assert embed["records_in"] == embed["records_out"] == build["records_in"]
    assert build["records_out"] == 1  # the summary record
