"""`--workers` workers whose parent stage is killed with SIGKILL exit quietly (issue 17).

The parent (a `sage map --workers 2` stage) is killed while its workers hold batches; a worker
that finishes its batch then finds the pipe back to the parent broken. It must end without a
traceback, and soon: none of them may outlive the parent for long. A worker deep in a long call
dies with its parent too, by the kernel's death signal: it keeps no thread to watch for it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.conftest import clean_env, sage_argv

USER_CODE = """
import os, time

def hold(r):
    open(os.path.join(os.environ["MARKS"], "%d-%d" % (os.getpid(), r["id"])), "w").close()
    time.sleep(0.3)
    return r

def stall(r):
    open(os.path.join(os.environ["MARKS"], "%d" % os.getpid()), "w").close()
    time.sleep(600)
    return r
"""


def _start_workers(tmp_path: Path, fn: str, records: int, busy: int) -> tuple[Any, Path]:
    """`sage map --fn usermod:FN --workers 2` fed `records` records, once `busy` workers are
    inside a call (each marks a file named after its pid in the returned folder)."""
    (tmp_path / "usermod.py").write_text(USER_CODE)
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = subprocess.Popen(
        sage_argv("map", "--fn", f"usermod:{fn}", "--workers", "2", "--batch-size", "1"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env=clean_env(MARKS=str(marks)),
    )
    assert proc.stdin is not None and proc.stderr is not None
    proc.stdin.write(b"".join(b'{"id": %d}\n' % i for i in range(records)))
    proc.stdin.flush()
    deadline = time.monotonic() + 60
    while len({p.name.split("-")[0] for p in marks.iterdir()}) < busy:
        assert time.monotonic() < deadline, "the workers never started"
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    return proc, marks


def test_orphaned_workers_exit_without_a_traceback(tmp_path: Path) -> None:
    # both workers are inside a batch, with more batches queued to them
    proc, _ = _start_workers(tmp_path, "hold", records=40, busy=2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdin.close()
    # the workers inherited the stage's stderr: it ends when the last of them is gone, so
    # this read also shows that none of them outlives its parent
    err = proc.stderr.read().decode()
    assert "Traceback" not in err, err
    assert "BrokenPipe" not in err, err


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError(f"no thread count for {pid}")


def test_a_worker_in_a_long_call_dies_with_its_parent_and_keeps_one_thread(tmp_path: Path) -> None:
    proc, marks = _start_workers(tmp_path, "stall", records=1, busy=1)
    worker = int(next(marks.iterdir()).name)
    assert _threads(worker) == 1  # no thread polling for the parent (it was 2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{worker}").exists():
        state = Path(f"/proc/{worker}/stat").read_text().split(")")[-1].split()[0]
        if state == "Z":  # dead, waiting for init to reap it
            break
        assert time.monotonic() < deadline, "the worker outlived its parent"
        time.sleep(0.05)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        stream.close()
