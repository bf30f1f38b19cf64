"""Waiting for a condition instead of sleeping: what tests use before they signal or kill.

A fixed sleep before a signal is a guess about how fast the machine is; under load the guess
is wrong and the test either fails or, worse, passes without exercising what it names. These
helpers poll something observable (a file, a pipe's fill level, a line on a stream, /proc)
until it holds, with a deadline that only a broken subject should ever reach.
"""

from __future__ import annotations

import fcntl
import os
import select
import termios
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T], what: str, timeout: float = 60, every: float = 0.01
) -> T:
    """Poll `condition` until it returns something truthy (returned); fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout}s waiting for {what}")
        time.sleep(every)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_gone(pids: Iterable[int], what: str = "the processes to end", timeout: float = 30) -> None:
    """Until none of `pids` is alive (killed processes take a moment to be reaped)."""
    pids = list(pids)
    wait_until(lambda: not [p for p in pids if alive(p)], what, timeout, every=0.02)


def pipe_pending(fd: int) -> int:
    """Bytes waiting in the pipe `fd` belongs to (either end)."""
    buf = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return int.from_bytes(buf, "little")


def pipe_size(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)


class StreamLines:
    """Reads a child's stream (its fd, unbuffered) until a line with some text shows up,
    keeping everything read so far in `data` (for the final assertions)."""

    def __init__(self, stream) -> None:  # noqa: ANN001 - a Popen pipe
        self.fd = stream.fileno()
        self.data = b""

    def wait_for(self, text: bytes, timeout: float = 60) -> bytes:
        """The first line holding `text`; fails if the stream ends or the deadline passes."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.data.splitlines():
                if text in line:
                    return line
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line with {text!r} within {timeout}s: {self.data!r}")
            if select.select([self.fd], [], [], min(left, 0.2))[0]:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    raise AssertionError(f"stream closed before {text!r}: {self.data!r}")
                self.data += chunk


def wait_pipe_full(fd: int, what: str, timeout: float = 60) -> None:
    """Until the pipe `fd` belongs to is full, but for at most a page: its writer is (about to
    be) blocked in write."""
    full = pipe_size(fd) - 4096
    wait_until(lambda: pipe_pending(fd) >= full, what, timeout)
