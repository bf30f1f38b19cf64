"""Nothing of a script outlives a `sage run` that is killed outright (kill -9, the OOM killer).

`sage run` holds the write end of a pipe no other process has (it is close-on-exec) and gives
the read end to bash at a fixed, high descriptor, named with its inode in SAGE_RUN_LIFELINE.
Every process of the script inherits it; every sage stage (sage_cli/__init__.py, first thing)
waits on it in a daemon thread. Nobody ever writes to it, so the read returns only when the
write end is gone, that is when `sage run` is: the stage then ends at once, as a stage of a
parsed pipeline does through PR_SET_PDEATHSIG. bash itself dies with `sage run` by
PR_SET_PDEATHSIG, so it starts nothing more; commands that are not sage stages end as their
neighbours' pipes close.
"""

from __future__ import annotations

import fcntl
import os
import signal
import stat
import threading

#: where bash finds the read end: above what scripts use (0-9, and bash's {var} fds from 10),
#: below 255 (bash keeps the script itself there)
LOWEST_FD = 200
_PR_SET_PDEATHSIG = 1


def open_lifeline() -> tuple[int, int, str]:
    """(read end for the child, write end to hold, the SAGE_RUN_LIFELINE value)."""
    read_end, write_end = os.pipe()
    high = fcntl.fcntl(read_end, fcntl.F_DUPFD_CLOEXEC, LOWEST_FD)
    os.close(read_end)
    return high, write_end, f"{high}:{os.fstat(high).st_ino}"


def die_with_parent() -> None:
    """In a child, before exec: SIGKILL when the parent ends."""
    import ctypes  # not on a stage's start-up path: only `sage run` without setpriv needs it

    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def hold(value: str) -> None:
    """In a stage: end this process when the run's `sage run` is gone. A descriptor that is
    not that pipe (closed, or reused by something else) is left alone."""
    try:
        fd_text, ino_text = value.split(":")
        fd = int(fd_text)
        info = os.fstat(fd)
    except (ValueError, OSError):
        return
    if not stat.S_ISFIFO(info.st_mode) or str(info.st_ino) != ino_text:
        return
    os.set_inheritable(fd, False)  # what this stage starts (a keeper's worker) needs it not

    def wait() -> None:
        try:
            while os.read(fd, 4096):
                pass
        except OSError:
            return
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=wait, name="sage-lifeline", daemon=True).start()
