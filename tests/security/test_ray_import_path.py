"""`--engine ray` keeps the import-path promise of tests/security/test_import_path.py (issue 17).

Ray copies the driver's current directory onto its workers' sys.path (first), so a stage that
joins Ray from the data directory would have its actors import an `orjson.py` lying there. Both
the private local Ray of `sage run --engine ray` and a running 2-node cluster (a stage whose
environment names it, what `sage run --engine ray --address` exports) are tried.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ndjson, parse_ndjson
from tests.scale.test_ray import cluster, ray_env  # noqa: F401 - the module's cluster
from tests.security.test_import_path import SHADOWED, assert_nothing_imported, plant

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


@pytest.fixture
def poisoned(tmp_path: Path) -> Path:
    plant(tmp_path, [*SHADOWED, "ray"])
    (tmp_path / "in.ndjson").write_bytes(ndjson([{"x": i} for i in range(20)]))
    (tmp_path / "p.sh").write_text("sage source in.ndjson | sage map r | sage filter 'True'\n")
    return tmp_path


def _sage(cwd: Path, *args: str, data: bytes = b"", **extra: str) -> subprocess.CompletedProcess:
    """The installed `sage` entry point, as cron would run it."""
    env = ray_env()
    env["PATH"] = str(BIN) + os.pathsep + env["PATH"]
    env.pop("PYTHONSAFEPATH", None)
    env.update(extra)
    return subprocess.run(
        [str(BIN / "sage"), *args], input=data, capture_output=True, env=env, cwd=cwd, timeout=300
    )


@pytest.mark.parametrize("script", ["p.sh", "two.sh"])
def test_private_local_ray_does_not_import_from_the_working_directory(poisoned, script):
    # p.sh: one pipeline, run in process; two.sh: bash runs it, each stage joins the local Ray
    (poisoned / "two.sh").write_text(
        "sage source in.ndjson > mid.ndjson\nsage map r < mid.ndjson\n"
    )
    result = _sage(poisoned, "run", "--engine", "ray", "--quiet", script)
    assert result.returncode == 0, result.stderr.decode()
    assert [r["x"] for r in parse_ndjson(result.stdout)] == list(range(20))
    assert_nothing_imported(poisoned)


def test_cluster_actors_do_not_import_from_the_working_directory(poisoned, cluster):  # noqa: F811
    data = (poisoned / "in.ndjson").read_bytes()
    result = _sage(poisoned, "map", "r", data=data, SAGE_RAY_ADDRESS=cluster)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == data
    assert_nothing_imported(poisoned)


def test_fn_module_is_still_found_on_ray(poisoned, cluster):  # noqa: F811
    (poisoned / "mine.py").write_text("def f(r):\n    return r | {'y': 2}\n")
    data = ndjson([{"x": 1}])
    result = _sage(poisoned, "map", "--fn", "mine:f", data=data, SAGE_RAY_ADDRESS=cluster)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == ndjson([{"x": 1, "y": 2}])
