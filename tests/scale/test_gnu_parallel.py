"""GNU parallel as the external alternative to --workers (docs/scale-out.md)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from collections import Counter

import pytest

from tests.conftest import ROOT, clean_env, ndjson, parse_ndjson

PARALLEL = shutil.which("parallel")


@pytest.fixture(autouse=True)
def _parallel_is_installed() -> None:
    # a failure, not a skip: a skipped interop test proves nothing, and `make test` installs it
    assert PARALLEL, "GNU parallel is not installed: run `make system-deps` (part of `make test`)"


def test_parallel_pipe_round_robin_gives_the_same_multiset():
    records = [{"id": i, "text": f"t{i}"} for i in range(20_000)]
    sage = f"{shlex.quote(sys.executable)} -m sage_cli"
    expr = shlex.quote('r | {"n": len(r["text"])}')
    # -q keeps EXPR one word through the shell parallel runs each job in; --pipe cuts stdin
    # into blocks at line ends; --round-robin hands them to 2 long-lived `sage map` processes;
    # --block keeps blocks small so both get work.
    command = (
        f"{shlex.quote(PARALLEL or 'parallel')} --will-cite -q --pipe --round-robin -j2 "
        f"--block 100k {sage} map {expr}"
    )
    result = subprocess.run(
        command,
        shell=True,
        input=ndjson(records),
        capture_output=True,
        env=clean_env(),
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = parse_ndjson(result.stdout)
    expected = [{**r, "n": len(r["text"])} for r in records]
    key = lambda r: (r["id"], r["text"], r["n"])  # noqa: E731
    assert Counter(map(key, out)) == Counter(map(key, expected))
    # every output line is a whole record: no two processes' lines got interleaved
    assert result.stdout.count(b"\n") == len(records)
