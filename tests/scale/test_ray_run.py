"""`sage run --engine ray SCRIPT`: the same script, the same output, the same trace format."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import clean_env, ndjson

SCRIPT = """#!/usr/bin/env bash
set -euo pipefail
# doubles x and keeps the multiples of 3
sage map 'r | {"y": r["x"] * 2}' < in.ndjson \\
  | sage filter 'r["y"] % 3 == 0' > out.ndjson
"""


@pytest.mark.slow
def test_sage_run_engine_ray_matches_bash_and_writes_a_trace(tmp_path: Path) -> None:
    (tmp_path / "in.ndjson").write_bytes(ndjson([{"id": i, "x": i} for i in range(3000)]))
    (tmp_path / "p.sh").write_text(SCRIPT)
    bin_dir = str(Path(sys.executable).parent)
    env = clean_env(PATH=f"{bin_dir}:/usr/bin:/bin", RAY_AUTH_MODE="disabled")

    local = subprocess.run(["bash", "p.sh"], cwd=tmp_path, env=env, capture_output=True)
    assert local.returncode == 0, local.stderr
    expected = (tmp_path / "out.ndjson").read_bytes()
    (tmp_path / "out.ndjson").unlink()

    ray = subprocess.run(
        [
            sys.executable,
            "-m",
            "sage_cli",
            "run",
            "--engine",
            "ray",
            "--replicas",
            "map=2",
            "--run-dir",
            "run",
            "-q",
            "p.sh",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert ray.returncode == 0, ray.stderr.decode()
    assert (tmp_path / "out.ndjson").read_bytes() == expected
    assert len(expected.splitlines()) == 1000

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == 0
    counts = {s["name"]: (s["records_in"], s["records_out"]) for s in summary["stages"]}
    assert counts == {"1-map": (3000, 3000), "2-filter": (3000, 1000)}


def test_engine_ray_refuses_local_only_flags(tmp_path: Path) -> None:
    (tmp_path / "p.sh").write_text(SCRIPT)
    result = subprocess.run(
        [sys.executable, "-m", "sage_cli", "run", "--engine", "ray", "--retries", "2", "p.sh"],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
    )
    assert result.returncode == 2
    assert result.stderr.decode().count("\n") == 1 and "--engine ray" in result.stderr.decode()


@pytest.mark.slow
def test_engine_ray_stamps_the_envelope_like_local_stages(tmp_path: Path) -> None:
    (tmp_path / "in.ndjson").write_bytes(ndjson([{"id": i, "x": i} for i in range(30)]))
    (tmp_path / "p.sh").write_text(SCRIPT)
    bin_dir = str(Path(sys.executable).parent)
    env = clean_env(PATH=f"{bin_dir}:/usr/bin:/bin", RAY_AUTH_MODE="disabled", SAGE_ENVELOPE="1")
    argv = [sys.executable, "-m", "sage_cli", "run", "--engine", "ray", "-q", "p.sh"]
    ray = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, timeout=300)
    assert ray.returncode == 0, ray.stderr.decode()
    out = [json.loads(line) for line in (tmp_path / "out.ndjson").read_text().splitlines()]
    assert [r["id"] for r in out] == list(range(0, 30, 3))
    assert len({r["_sage"]["run"] for r in out}) == 1
    assert all([s["stage"] for s in r["_sage"]["stages"]] == ["map", "filter"] for r in out)
