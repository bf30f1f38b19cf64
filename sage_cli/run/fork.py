"""Running a sage command in a forked copy of this interpreter instead of a new one.

A fresh `python -m sage_cli VERB` spends ~70 ms before it reads a record (the interpreter,
typer, sage's modules); a process that has all of that loaded already can fork and run the
command at once. Two places do: a keeper starts its worker so (sage_cli.run.keeper), and `sage
run` starts the sage stages of a pipeline it parsed so (sage_cli.run.supervisor). The child
runs the command as `python -P -m sage_cli ARGV` would: its own environment, directory,
signal handlers and exit handlers, none of the parent's descriptors or exit handlers.

Forking is safe only while the parent has no other thread (one holding a lock at the fork
would leave it held in the child forever): `can_fork` says so.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any

#: prctl(2) options: die by a signal when the parent thread ends; name the process
PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_prctl: list[Callable[..., int] | None] = []  # libc's prctl, looked up once (None: not there)


#: variables read when an interpreter (or libc) starts, not after: a stage whose environment
#: sets one differently from this process's (`PYTHONPATH=lib sage map ...`) needs a new one
_READ_AT_START = ("PYTHON", "LD_", "MALLOC_", "GLIBC_", "LC_", "LANG")


def can_fork(env: dict[str, str] | None = None) -> bool:
    """Linux, no thread but this one, and (for a command that runs with `env`) nothing in
    `env` that only a new interpreter would take into account."""
    if not sys.platform.startswith("linux") or threading.active_count() != 1:
        return False
    if env is None:
        return True
    mine = os.environ
    names = {k for k in (*env, *mine) if k.startswith(_READ_AT_START)}
    return all(env.get(k) == mine.get(k) for k in names)


def _close_all_but(keep_fd: int) -> None:
    """In a forked child: no descriptor of the parent's but stdin, stdout, stderr and
    `keep_fd` (a keeper's stdout, for a worker that passes its output through; -1: none)."""
    try:
        limit = os.sysconf("SC_OPEN_MAX")
    except (OSError, ValueError):  # pragma: no cover
        limit = 1 << 16
    if keep_fd > 2:
        os.closerange(3, keep_fd)
        os.closerange(keep_fd + 1, limit)
    else:
        os.closerange(3, limit)


def _open_missing_std_streams() -> None:  # pragma: no cover - child
    """In a forked child: a standard stream the parent started without (its descriptor was
    closed, `sage run ... >&-`) is None in Python, while the child's descriptor is now its pipe
    or file: open it as a new interpreter would have."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        if getattr(sys, name) is not None:
            continue
        try:
            os.fstat(fd)
        except OSError:
            continue  # closed here too: None, as in a new interpreter
        errors = "backslashreplace" if name == "stderr" else "strict"
        setattr(sys, name, open(fd, mode, encoding="utf-8", errors=errors, closefd=False))  # noqa: SIM115


def _run_command(argv: list[str], env: dict[str, str]) -> int:  # pragma: no cover - child
    """The command, as a fresh `python -m sage_cli ARGV` would run it, ending the way the
    interpreter ends (non-daemon threads joined, exit handlers run, streams flushed)."""
    import traceback

    _forget_parent_exit_handlers()
    _open_missing_std_streams()
    os.environ.clear()
    os.environ.update(env)
    code = 1
    try:
        from sage_cli.cli.group import run

        code = run(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            sys.stderr.write(f"{exc.code}\n")
    except KeyboardInterrupt:
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        threading._shutdown()  # type: ignore[attr-defined]
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    return code


def _forget_parent_exit_handlers() -> None:  # pragma: no cover - child
    """What the parent registered to run at its exit (a temporary directory's clean-up) is
    the parent's business, not the child's."""
    atexit._clear()
    registry: dict[Any, Any] = getattr(weakref.finalize, "_registry", {})
    for finalizer in list(registry):
        finalizer.atexit = False
    if getattr(weakref.finalize, "_registered_with_atexit", False):
        atexit.register(weakref.finalize._exitfunc)  # type: ignore[attr-defined]


def fork_command(
    argv: list[str],
    env: dict[str, str],
    stdin: int,
    stdout: int,
    stderr: int = 2,
    *,
    cwd: str | None = None,
    name: str | None = None,
    own_group: bool = True,
    dies_with_parent: bool = True,
    keep_fd: int = -1,
) -> int:
    """Start `sage ARGV` in a forked child with these descriptors as its 0, 1 and 2 (and
    `keep_fd`, all others closed), in `cwd`; in a process group of its own (`own_group`), killed
    when this process dies, even by kill -9 (`dies_with_parent`), shown as `name` by ps and
    top. Returns its pid. The caller checks `can_fork(env)` first."""
    prctl = libc_prctl() if dies_with_parent or name else None
    parent = os.getpid()
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:  # None: that descriptor was closed when Python started (`>&-`)
            stream.flush()
    # a signal for this process (Ctrl-C) must not run this process's handlers in the child
    # before it has set its own: held back across the fork
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        raise
    if pid == 0:  # pragma: no cover - the child (what the tests check is its behaviour)
        code = 1
        try:
            if own_group:
                os.setpgid(0, 0)
            if prctl is not None:
                if dies_with_parent:
                    prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
                if name:
                    prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
            if dies_with_parent and os.getppid() != parent:  # it died before the signal was set
                os._exit(137)
            for fd, target in ((stdin, 0), (stdout, 1), (stderr, 2)):
                if fd != target:
                    os.dup2(fd, target)
            _close_all_but(keep_fd)
            if cwd is not None:
                os.chdir(cwd)
            if not sys.flags.safe_path and sys.path:
                del sys.path[0]  # -P: the script's or pipeline's directory is not searched
            sys.argv = ["sage", *argv]
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
            code = _run_command(argv, env)
        finally:
            os._exit(code)
    signal.pthread_sigmask(signal.SIG_SETMASK, held)
    if own_group:
        try:
            os.setpgid(pid, pid)  # here too: the parent may signal the group before it ran
        except OSError:
            pass  # it has set it itself (or is gone already)
    return pid


def libc_prctl() -> Callable[..., int] | None:
    """libc's prctl(2), looked up once; None where there is none (not Linux)."""
    if not _prctl:
        try:
            import ctypes

            _prctl.append(ctypes.CDLL(None, use_errno=True).prctl)
        except (OSError, AttributeError, ImportError):  # pragma: no cover - not Linux
            _prctl.append(None)
    return _prctl[0]
