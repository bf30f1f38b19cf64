"""One stage at a time on Ray: a `sage` stage whose environment names a cluster
(SAGE_RAY_ADDRESS, what `sage run --engine ray` exports to a script bash runs) stays where the
script started it and runs its batches on Ray actors of that cluster. So any script (a loop, a
function) runs on Ray, stage by stage, with the output a local run gives.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest

from tests.conftest import parse_ndjson
from tests.fixtures.ray_cluster import SESSIONS
from tests.scale.test_ray import _pgrep, cluster, ray_env  # noqa: F401 - the module's cluster

pytestmark = pytest.mark.slow

BIN = str(Path(sys.executable).parent)  # this venv's `sage`

SCRIPT = """
set -euo pipefail
double() { sage map '{"id": r["id"], "n": r["n"] * 2, "part": r["part"]}'; }
for part in a b; do
  sage map '{"id": r["id"], "n": r["n"], "part": "'"$part"'"}' < "$part.ndjson" \\
    | double | sage filter 'r["n"] % 3 != 0'
done | sage dedupe --key id
"""


def _inputs(tmp_path: Path) -> None:
    for k, part in enumerate("ab"):
        lines = [f'{{"id": "{part}{i}", "n": {i + k}}}' for i in range(3000)]
        (tmp_path / f"{part}.ndjson").write_text("\n".join(lines) + "\n")


def _run(tmp_path: Path, **extra: str) -> subprocess.CompletedProcess[bytes]:
    (tmp_path / "script.sh").write_text(SCRIPT)
    env = ray_env()
    env["PATH"] = BIN + os.pathsep + env["PATH"]
    env.update(extra)
    return subprocess.run(
        ["bash", "-o", "pipefail", "script.sh"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        timeout=600,
    )


def test_a_script_with_a_loop_and_a_function_runs_its_batches_on_ray(cluster, tmp_path):  # noqa: F811
    _inputs(tmp_path)
    local = _run(tmp_path)
    assert local.returncode == 0, local.stderr.decode()

    seen: set[int] = set()
    done = threading.Event()

    def watch() -> None:  # the actors of this cluster while the script runs
        while not done.is_set():
            seen.update(_pgrep(SESSIONS[cluster], "ray::StageActor"))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        on_ray = _run(tmp_path, SAGE_RAY_ADDRESS=cluster, SAGE_RAY_REPLICAS="filter=3")
    finally:
        done.set()
        watcher.join()
    assert on_ray.returncode == 0, on_ray.stderr.decode()
    assert on_ray.stdout == local.stdout
    out = parse_ndjson(on_ray.stdout)
    assert (
        len(out)
        == len({r["id"] for r in out})
        == sum(1 for part, k in (("a", 0), ("b", 1)) for i in range(3000) if ((i + k) * 2) % 3 != 0)
    )
    # 2 iterations x (map, double's map: 2 actors each; filter: 3) + dedupe (state: 1 actor)
    assert len(seen) >= 5, f"actors seen: {sorted(seen)}"


def test_sage_run_engine_ray_runs_a_script_with_a_loop(cluster, tmp_path):  # noqa: F811
    """`sage run --engine ray` on a script its one-process engine cannot take (a loop): bash
    runs the script, every sage stage in it runs its batches on the cluster."""
    _inputs(tmp_path)
    local = _run(tmp_path)
    assert local.returncode == 0, local.stderr.decode()
    env = ray_env()
    env["PATH"] = BIN + os.pathsep + env["PATH"]
    on_ray = subprocess.run(
        [
            sys.executable,
            "-m",
            "sage_cli",
            "run",
            "--engine",
            "ray",
            "--address",
            cluster,
            "--replicas",
            "filter=3",
            "script.sh",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        timeout=600,
    )
    assert on_ray.returncode == 0, on_ray.stderr.decode()
    assert on_ray.stdout == local.stdout
    from sage_cli.run.directory import find_run
    from sage_cli.run.registry import read_registry

    run = find_run(None, str(tmp_path / ".sage" / "runs"))
    assert orjson.loads((run.path / "run.json").read_bytes())["engine"] == "ray"
    names = {e["name"].split("-", 1)[1] for e in read_registry(run.stages_dir)}
    assert names == {"map", "filter", "dedupe"}
