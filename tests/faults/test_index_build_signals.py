"""SIGTERM (and SIGKILL) during `sage index build` (issue 6, faults).

SIGTERM at any point: exit 143, nothing on stderr but what the stage had to say (no traceback),
the old index exactly as it was, no temporary directory left, and a retry builds. The signal is
sent while the records are read and, deterministically, once the write phase has begun (the
temporary `.idx.building-*` directory exists). SIGKILL cannot be handled: the old index must
still be whole, and the next build removes what the killed one left.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import clean_env, parse_ndjson, run_sage, sage_argv
from tests.faults.conftest import tree_digest, vector_records, write_ndjson

N = 6000


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("signals")
    return (
        write_ndjson(d / "old.ndjson", vector_records(30, dim=48)),
        write_ndjson(d / "new.ndjson", vector_records(N, dim=48, seed=3)),
    )


def _old_index(tmp_path: Path, old: Path) -> tuple[Path, dict[str, str]]:
    idx = tmp_path / "idx"
    done = run_sage("index", "build", str(idx), str(old))
    assert done.returncode == 0, done.stderr
    return idx, tree_digest(idx)


def _start(idx: Path, new: Path) -> subprocess.Popen:
    return subprocess.Popen(
        sage_argv("index", "build", str(idx), str(new), "--trees", "64"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )


def _wait_for_write_phase(proc: subprocess.Popen, idx: Path, timeout: float = 60) -> bool:
    stop = time.monotonic() + timeout
    while time.monotonic() < stop and proc.poll() is None:
        if any(p.name.startswith(".idx.building-") for p in idx.parent.iterdir()):
            return True
        time.sleep(0.002)
    return False


def _temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".idx."))


def _count(idx: Path) -> int:
    info = run_sage("index", "info", str(idx), "--json")
    assert info.returncode == 0, info.stderr
    return parse_ndjson(info.stdout)[0]["count"]


@pytest.mark.parametrize("when", ["reading", "writing"])
def test_sigterm_keeps_the_old_index_and_a_retry_builds(tmp_path, inputs, when):
    old, new = inputs
    idx, before = _old_index(tmp_path, old)
    proc = _start(idx, new)
    if when == "reading":
        time.sleep(0.15)
    else:
        assert _wait_for_write_phase(proc, idx), "the build ended before its write phase was seen"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)

    assert proc.returncode == 143, err
    assert b"Traceback" not in err and b"Error" not in err, err
    assert out == b""  # no summary record: no new index
    assert tree_digest(idx) == before
    assert _temporaries(tmp_path) == []
    assert _count(idx) == 30

    retry = run_sage("index", "build", str(idx), str(new))
    assert retry.returncode == 0, retry.stderr
    assert _count(idx) == N
    assert _temporaries(tmp_path) == []


def test_sigterm_with_no_old_index_leaves_no_index(tmp_path, inputs):
    _, new = inputs
    idx = tmp_path / "idx"
    proc = _start(idx, new)
    assert _wait_for_write_phase(proc, idx)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    retrieve = run_sage("retrieve", "--index", str(idx), input=b'{"query": "doc"}\n')
    assert retrieve.returncode == 69, retrieve.stderr


def test_sigkill_keeps_the_old_index_and_the_next_build_cleans_up(tmp_path, inputs):
    old, new = inputs
    idx, before = _old_index(tmp_path, old)
    proc = _start(idx, new)
    assert _wait_for_write_phase(proc, idx)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert tree_digest(idx) == before  # the half-written index is beside it, never in it
    assert _count(idx) == 30
    left = _temporaries(tmp_path)
    assert left and all(name.startswith(".idx.building-") for name in left)

    retry = run_sage("index", "build", str(idx), str(old))
    assert retry.returncode == 0, retry.stderr
    assert _temporaries(tmp_path) == []  # the dead build's directory is gone
    assert tree_digest(idx)["records.ndjson"] == before["records.ndjson"]


def test_an_old_index_moved_aside_by_a_killed_build_is_put_back(tmp_path, inputs):
    """SIGKILL between the two renames of the swap: DIR is missing, the old index is in
    `.idx.old-PID-*`. The next build (of anything) puts it back before deciding."""
    old, _ = inputs
    idx, before = _old_index(tmp_path, old)
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid now names no process
    aside = tmp_path / f".idx.old-{gone.pid}-abc123"
    idx.rename(aside)
    # even a build that writes nothing (no records, or refused ones) puts the old index back
    empty = run_sage("index", "build", str(idx), input=b"")
    assert empty.returncode == 0, empty.stderr
    assert tree_digest(idx) == before
    assert _temporaries(tmp_path) == []
    idx.rename(aside)
    twice = b'{"id": "x", "text": "t", "embedding": [1]}\n' * 2
    bad = run_sage("index", "build", str(idx), input=twice)
    assert bad.returncode == 65, bad.stderr  # duplicate id
    assert tree_digest(idx) == before
    assert _temporaries(tmp_path) == []
