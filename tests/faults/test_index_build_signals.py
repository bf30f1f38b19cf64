"""SIGTERM (and SIGKILL) during `sage index build` (issue 6, faults).

SIGTERM at any point: exit 143, nothing on stderr but what the stage had to say (no traceback),
the old index exactly as it was, no temporary directory left, and a retry builds. The signal is
sent, each time deterministically: while sage starts (its handler is in place, modules are
still being imported: this once let the whole build run and exit 0, see sage_cli.cli.command.
guarded), while it waits for the second half of its input, and once the write phase has begun
(the temporary `.idx.building-*` directory exists). SIGKILL cannot be handled: the old index must
still be whole, and the next build removes what the killed one left.
"""

from __future__ import annotations

import array
import fcntl
import signal
import subprocess
import termios
import threading
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


def _start(idx: Path, new: Path | None) -> subprocess.Popen:
    """`sage index build IDX NEW`, or with NEW None reading a stdin pipe the test feeds."""
    files = [str(new)] if new is not None else []
    return subprocess.Popen(
        sage_argv("index", "build", str(idx), *files, "--trees", "64"),
        stdin=subprocess.PIPE if new is None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )


def _feed_until_drained(proc: subprocess.Popen, data: bytes, timeout: float = 60) -> None:
    """Write `data` to the stage's stdin and wait until it has read all of it: it is then
    deep in the reading phase, blocked on more input."""
    writer = threading.Thread(target=proc.stdin.write, args=(data,))
    writer.start()
    writer.join(timeout)
    proc.stdin.flush()
    pending = array.array("i", [0])
    stop = time.monotonic() + timeout
    while time.monotonic() < stop:
        fcntl.ioctl(proc.stdin.fileno(), termios.FIONREAD, pending)
        if pending[0] == 0:
            return
        time.sleep(0.002)
    raise AssertionError("the stage did not read its input")


def _wait_for_write_phase(proc: subprocess.Popen, idx: Path, timeout: float = 60) -> bool:
    stop = time.monotonic() + timeout
    while time.monotonic() < stop and proc.poll() is None:
        if any(p.name.startswith(".idx.building-") for p in idx.parent.iterdir()):
            return True
        time.sleep(0.002)
    return False


def _wait_for_sigterm_handler(proc: subprocess.Popen, timeout: float = 60) -> bool:
    """Until sage has installed its handler (before that, SIGTERM kills Python outright,
    which is fine but not what is tested here): the SIGTERM bit of SigCgt in /proc."""
    stop = time.monotonic() + timeout
    while time.monotonic() < stop and proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except OSError:
            return False
        caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
        if int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)):
            return True
        time.sleep(0.002)
    return False


def _temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".idx."))


def _count(idx: Path) -> int:
    info = run_sage("index", "info", str(idx), "--json")
    assert info.returncode == 0, info.stderr
    return parse_ndjson(info.stdout)[0]["count"]


@pytest.mark.parametrize("when", ["starting", "reading", "writing"])
def test_sigterm_keeps_the_old_index_and_a_retry_builds(tmp_path, inputs, when):
    old, new = inputs
    idx, before = _old_index(tmp_path, old)
    if when == "starting":  # handler installed, modules still being imported
        proc = _start(idx, new)
        assert _wait_for_sigterm_handler(proc), "sage never installed its SIGTERM handler"
    elif when == "reading":  # half the records read, waiting for the rest
        proc = _start(idx, None)
        lines = new.read_bytes().splitlines(keepends=True)
        _feed_until_drained(proc, b"".join(lines[: len(lines) // 2]))
    else:
        proc = _start(idx, new)
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
