"""Files lying in the working directory are data, never code sage imports.

A cron job often runs sage inside the directory it processes. Python puts the current directory
first on sys.path for `python -c` and `python -m`, so sage must never start Python that way
there: `--workers` spawns `python -c ...` (PYTHONSAFEPATH set for it) and `sage run --check`
starts `python -P -m sage_cli` per stage. Modules named like the ones sage imports, dropped in
the working directory, would leave a marker file if imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import clean_env, ndjson, parse_ndjson

BIN = Path(sys.executable).parent
SHADOWED = ["multiprocessing", "typer", "orjson", "numpy", "json", "sage_cli", "operators"]


def plant(directory: Path, names: list[str]) -> None:
    """A module per name in `directory` that, once imported, leaves PWNED-name beside itself
    (by its own path: the importing process may run in another directory) and fails."""
    for name in names:
        (directory / f"{name}.py").write_text(
            "import os\n"
            f"open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'PWNED-{name}'), 'w')"
            ".close()\nraise ImportError('shadowed')\n"
        )


@pytest.fixture
def poisoned(tmp_path: Path) -> Path:
    plant(tmp_path, SHADOWED)
    return tmp_path


def sage(cwd: Path, *args: str, input: bytes = b"") -> subprocess.CompletedProcess:
    """The installed `sage` entry point, as cron would run it."""
    env = clean_env()
    env["PATH"] = str(BIN) + os.pathsep + env["PATH"]
    env.pop("PYTHONSAFEPATH", None)
    return subprocess.run(
        [str(BIN / "sage"), *args], input=input, capture_output=True, env=env, cwd=cwd, timeout=120
    )


def assert_nothing_imported(cwd: Path) -> None:
    assert sorted(p.name for p in cwd.glob("PWNED-*")) == []


def test_workers_do_not_import_from_the_working_directory(poisoned):
    result = sage(poisoned, "map", "r", "--workers", "2", input=ndjson([{"x": 1}, {"x": 2}]))
    assert result.returncode == 0, result.stderr
    assert result.stdout == ndjson([{"x": 1}, {"x": 2}])
    assert_nothing_imported(poisoned)


def test_fn_module_is_still_found_with_workers(poisoned):
    (poisoned / "mine.py").write_text("def f(r):\n    return r | {'y': 2}\n")
    result = sage(poisoned, "map", "--fn", "mine:f", "--workers", "2", input=ndjson([{"x": 1}]))
    assert result.returncode == 0, result.stderr
    assert result.stdout == ndjson([{"x": 1, "y": 2}])


@pytest.mark.parametrize("check", [True, False])
def test_sage_run_does_not_import_from_the_working_directory(poisoned, check):
    (poisoned / "p.sh").write_text("sage source in.ndjson | sage map r | sage filter True\n")
    (poisoned / "in.ndjson").write_bytes(ndjson([{"x": 1}]))
    result = sage(poisoned, "run", *(["--check"] if check else ["--quiet"]), "p.sh")
    assert result.returncode == 0, result.stderr
    if not check:
        assert [r["x"] for r in parse_ndjson(result.stdout)] == [1]
    assert_nothing_imported(poisoned)
