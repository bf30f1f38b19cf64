"""A sage stage started by bash inside `sage run` ends, with its process group, when `sage run`'s
end of the lifeline pipe closes (sage_cli.run.lifeline): through the kernel (an O_ASYNC pipe
whose signal is SIGKILL), with no thread in the stage; through a thread where that cannot be
set up. Each child here runs in a session of its own: the group it kills is its own."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from sage_cli.run.lifeline import LOWEST_FD
from tests.conftest import clean_env
from tests.readiness import alive, wait_gone

#: imports sage_cli as a stage does (hold() runs first thing), starts a process in its group,
#: says how many threads it has and that process's pid, then waits to be killed
CHILD = """
import os, subprocess, sys, time
{before}
import sage_cli
helper = subprocess.Popen(["sleep", "60"])
print(len(os.listdir("/proc/self/task")), helper.pid, flush=True)
time.sleep(60)
"""


@pytest.fixture
def lifeline() -> Iterator[tuple[int, int, str]]:
    """(read end at a high descriptor, write end, SAGE_RUN_LIFELINE), as `sage run` makes it."""
    read_end, write_end = os.pipe()
    high = fcntl.fcntl(read_end, fcntl.F_DUPFD, LOWEST_FD)
    os.close(read_end)
    ends = [high, write_end]
    yield high, write_end, f"{high}:{os.fstat(high).st_ino}"
    for fd in ends:
        try:
            os.close(fd)
        except OSError:
            pass


def spawn(
    lifeline: tuple[int, int, str], value: str | None = None, before: str = ""
) -> subprocess.Popen:
    """The child, handed the lifeline's read end and SAGE_RUN_LIFELINE (`value`: another)."""
    high, _, own = lifeline
    return subprocess.Popen(
        [sys.executable, "-c", CHILD.format(before=before)],
        env=clean_env(SAGE_RUN_LIFELINE=own if value is None else value),
        pass_fds=(high,),
        stdout=subprocess.PIPE,
        start_new_session=True,
    )


def start(
    lifeline: tuple[int, int, str], before: str = "", value: str | None = None
) -> tuple[subprocess.Popen, int, int]:
    """spawn, and what the child says once it is set up: its threads and its helper's pid."""
    proc = spawn(lifeline, value, before)
    assert proc.stdout is not None
    threads, helper = (int(x) for x in proc.stdout.readline().split())
    return proc, threads, helper


def end(proc: subprocess.Popen, helper: int) -> None:
    for pid in (proc.pid, helper):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    proc.wait(timeout=10)


@pytest.mark.parametrize(
    ("before", "threads"),
    [
        ("", 1),  # the kernel does it: no thread in the stage
        ("import fcntl; del fcntl.F_SETSIG", 2),  # no F_SETSIG: a thread waits on the pipe
    ],
    ids=["kernel", "thread"],
)
def test_the_stage_and_its_group_end_when_the_write_end_closes(
    lifeline: tuple[int, int, str], before: str, threads: int
) -> None:
    proc, seen, helper = start(lifeline, before)
    try:
        assert seen == threads
        assert proc.poll() is None and alive(helper)
        os.close(lifeline[1])  # what sage run's death does
        assert proc.wait(timeout=10) == -signal.SIGKILL
        wait_gone([helper], "the stage's group to die with it", timeout=10)
    finally:
        end(proc, helper)


def test_a_stage_started_after_sage_run_died_ends_at_once(
    lifeline: tuple[int, int, str],
) -> None:
    os.close(lifeline[1])
    proc = spawn(lifeline)
    try:
        assert proc.wait(timeout=10) == -signal.SIGKILL
        assert proc.stdout is not None and proc.stdout.read() == b""  # ended before it printed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_descriptor_that_is_not_the_lifeline_is_left_alone(
    lifeline: tuple[int, int, str],
) -> None:
    other = lifeline[2].split(":")[0] + ":1"  # the same descriptor, another inode
    proc, seen, helper = start(lifeline, value=other)
    try:
        assert seen == 1
        os.close(lifeline[1])
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=0.5)  # a bound on a negative: nothing is armed to kill it
    finally:
        end(proc, helper)
