"""Nothing of a script outlives a `sage run` that is killed outright (kill -9, the OOM killer).

`sage run` holds the write end of a pipe no other process has (it is close-on-exec) and gives
the read end to bash at a fixed, high descriptor, named with its inode in SAGE_RUN_LIFELINE.
Every process of the script inherits it. Nobody ever writes to it, so its write end closes only
when `sage run` is gone; every sage stage (sage_cli/__init__.py, first thing) asks the kernel to
SIGKILL its process group then (bash's, which `sage run` started in a group of its own: the
script's shell, its subshells and every command they started that did not leave the group), as
a stage of a parsed pipeline ends through PR_SET_PDEATHSIG: the stage opens the pipe again
through /proc (a file description of its own: an owner is one per description, and the script's
processes share the inherited one), makes it signal-driven (O_ASYNC) with SIGKILL as the signal
(F_SETSIG) and its group as the owner. A pipe signals its readers when its last writer closes.
Where that cannot be set up, a daemon thread blocks on the pipe and kills the group itself; the
kernel's way is preferred because any second thread costs a light stage ~4% more CPU (glibc's
malloc takes locks once a process has two threads: measured on `sage filter` over 1M
records). bash itself also dies with `sage run` by PR_SET_PDEATHSIG, so it starts nothing more;
commands in a group of their own end as their neighbours' pipes close.
"""

from __future__ import annotations

import fcntl
import os
import signal
import stat
from collections.abc import Callable

#: where bash finds the read end: above what scripts use (0-9, and bash's {var} fds from 10),
#: below 255 (bash keeps the script itself there)
LOWEST_FD = 200


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
    # not on a stage's start-up path: only a child started without setpriv
    from sage_cli.run.fork import PR_SET_PDEATHSIG, libc_prctl

    prctl = libc_prctl()
    if prctl is None:  # pragma: no cover - not Linux
        return argv, None

    def set_death_signal() -> None:  # in the child, before exec: nothing to import there
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return argv, set_death_signal


def hold(value: str) -> None:
    """In a stage: end this process and its group when the run's `sage run` is gone. A
    descriptor that is not that pipe (closed, or reused by something else) is left alone."""
    try:
        fd_text, ino_text = value.split(":")
        fd = int(fd_text)
        info = os.fstat(fd)
    except (ValueError, OSError):
        return
    if not stat.S_ISFIFO(info.st_mode) or str(info.st_ino) != ino_text:
        return
    os.set_inheritable(fd, False)  # what this stage starts (a keeper's worker) needs it not
    if not _kernel_kills_group_when_closed(fd):
        import threading

        threading.Thread(
            target=_wait_then_kill, args=(fd,), name="sage-lifeline", daemon=True
        ).start()


def _kernel_kills_group_when_closed(fd: int) -> bool:
    """Arm the kernel to SIGKILL this process's group when the pipe at `fd` loses its last
    writer; False where it cannot be (no /proc, no F_SETSIG: not Linux)."""
    set_signal = getattr(fcntl, "F_SETSIG", None)
    if set_signal is None or not hasattr(os, "O_ASYNC"):
        return False
    try:
        own = os.open(
            f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
        )  # a pipe's own reader: opening it for reading does not wait for a writer
    except OSError:
        return False
    try:
        fcntl.fcntl(own, fcntl.F_SETOWN, -os.getpgrp())
        fcntl.fcntl(own, set_signal, signal.SIGKILL)
        fcntl.fcntl(own, fcntl.F_SETFL, os.O_RDONLY | os.O_NONBLOCK | os.O_ASYNC)
    except OSError:
        os.close(own)
        return False
    # kept open for the process's life (its owner setting lives in this description); the
    # write end may have closed before it was armed: then nothing would signal
    try:
        gone = os.read(own, 1) == b""
    except OSError:  # BlockingIOError: the writer is there
        gone = False
    if gone:
        _kill_group()
    return True


def _wait_then_kill(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except OSError:
        return
    _kill_group()


def _kill_group() -> None:
    # the script's whole process group (bash's, which `sage run` made: the script's shell,
    # its subshells, every stage) at once, this process with it: the write end closes
    # before the kernel sends bash its death signal, and a stage that died alone first
    # let bash run the script's next command (`echo ... >> file`) in between
    try:
        os.killpg(os.getpgrp(), signal.SIGKILL)
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGKILL)
