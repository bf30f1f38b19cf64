"""Shared test helpers: run sage in a real subprocess, or through typer's CliRunner."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[1]
#: test data carried inside the repo (a clone has nothing beside it)
DATA = ROOT / "tests" / "data"

_RUN_TMP: str | None = None


def pytest_configure(config: pytest.Config) -> None:
    """Make the run independent of its launcher and of the machine's history.

    - A job started in the background (`make check &`, nohup, some CI runners) inherits SIGINT
      (and sometimes SIGTERM) ignored, and an ignored signal stays ignored across exec, so the
      children the tests signal would never see it. A Python handler here is reset to the
      default by exec: every child starts with default dispositions.
    - One cache directory per run (embeddings, answers, model hashes) in a temp dir removed at
      the end: nothing is served from, or left in, ~/.cache/sage. Tests that need their own
      cache still set SAGE_CACHE_DIR themselves.
    """
    global _RUN_TMP
    for sig, handler in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, None)):
        if signal.getsignal(sig) is signal.SIG_IGN:
            signal.signal(sig, handler or (lambda signum, frame: sys.exit(128 + signum)))
    if _RUN_TMP is None:
        _RUN_TMP = tempfile.mkdtemp(prefix="sage-test-run-")
        os.environ["SAGE_CACHE_DIR"] = os.path.join(_RUN_TMP, "cache")


def pytest_unconfigure(config: pytest.Config) -> None:
    global _RUN_TMP
    if _RUN_TMP is not None:
        shutil.rmtree(_RUN_TMP, ignore_errors=True)
        _RUN_TMP = None


def run_tmp() -> Path:
    """This test run's private temp root (removed when the run ends)."""
    assert _RUN_TMP is not None
    return Path(_RUN_TMP)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a sage subprocess: PYTHONUNBUFFERED removed (DESIGN §7)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env.pop("SAGE_DEBUG", None)
    env.pop("SAGE_ENVELOPE", None)  # records stay as the tests expect unless a test asks
    env.update(extra)
    return env


def sage_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "sage_cli", *args]


def run_sage(
    *args: str,
    input: bytes | str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    cwd: str | Path | None = None,
) -> subprocess.CompletedProcess:
    """Run `sage ARGS` as a subprocess and return the completed process (bytes out/err)."""
    if isinstance(input, str):
        input = input.encode()
    return subprocess.run(
        sage_argv(*args),
        input=input,
        capture_output=True,
        env=env or clean_env(),
        timeout=timeout,
        cwd=cwd,
    )


def ndjson(records: list[dict[str, Any]]) -> bytes:
    from sage_cli.operators.ndjson import dump_record  # integers beyond 64 bits too

    return b"".join(dump_record(r) for r in records)


def parse_ndjson(data: bytes | str) -> list[dict[str, Any]]:
    if isinstance(data, str):
        data = data.encode()
    return [orjson.loads(line) for line in data.splitlines() if line.strip()]


class Cli:
    """typer's CliRunner over the whole `sage` app, stdout and stderr kept apart."""

    def __init__(self) -> None:
        from typer.testing import CliRunner

        self.runner = CliRunner()

    def __call__(self, *args: str, input: str | bytes | None = None) -> Any:
        from sage_cli.app import app

        return self.runner.invoke(app, list(args), input=input, catch_exceptions=False)


@pytest.fixture
def cli() -> Cli:
    return Cli()


@pytest.fixture
def sage():
    return run_sage


# model fixtures (tiny random-weight GGUFs, real model dirs): tests/fixtures/models.py
from tests.fixtures.models import real_model_dirs, tiny_bert, tiny_llama, tiny_model_dir  # noqa: E402, F401, I001
