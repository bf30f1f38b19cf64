"""Nothing of a script outlives a `sage run` that is killed outright (kill -9, the OOM killer).

`sage run` holds the write end of a pipe no other process has (it is close-on-exec) and gives
the read end to bash at a fixed, high descriptor, named with its inode in SAGE_RUN_LIFELINE.
Every process of the script inherits it; every sage stage (sage_cli/__init__.py, first thing)
waits on it in a daemon thread. Nobody ever writes to it, so the read returns only when the
write end is gone, that is when `sage run` is: the stage then ends at once, as a stage of a
parsed pipeline does through PR_SET_PDEATHSIG, and takes its process group with it (bash's,
which `sage run` started in a group of its own: the script's shell, its subshells and every
command they started that did not leave the group). bash itself also dies with `sage run` by
PR_SET_PDEATHSIG, so it starts nothing more; commands in a group of their own end as their
neighbours' pipes close.
"""

from __future__ import annotations

import fcntl
import os
import signal
import stat
import threading
from collections.abc import Callable

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


_SETPRIV: list[str | None] = []  # util-linux setpriv, looked up once (None: not there)


def dies_with_parent(argv: list[str]) -> tuple[list[str], Callable[[], None] | None]:
    """(argv, preexec_fn) for a child that gets SIGKILL when its parent ends, even on the
    parent's kill -9. Through util-linux `setpriv --pdeathsig`, which execs the command, so
    Popen can still use vfork (with a preexec_fn it cannot: starting 4 stages took up to 0.4 s
    each under load); without setpriv, prctl in a preexec_fn."""
    if not _SETPRIV:
        import shutil
        import sys

        _SETPRIV.append(shutil.which("setpriv") if sys.platform.startswith("linux") else None)
    if _SETPRIV[0]:
        return [_SETPRIV[0], "--pdeathsig", "KILL", "--", *argv], None
    import ctypes  # not on a stage's start-up path: only a child started without setpriv

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return argv, None

    def set_death_signal() -> None:  # in the child, before exec: nothing to import there
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return argv, set_death_signal


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
        # the script's whole process group (bash's, which `sage run` made: the script's shell,
        # its subshells, every stage) at once, this process with it: the write end closes
        # before the kernel sends bash its death signal, and a stage that died alone first
        # let bash run the script's next command (`echo ... >> file`) in between
        try:
            os.killpg(os.getpgrp(), signal.SIGKILL)
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=wait, name="sage-lifeline", daemon=True).start()
