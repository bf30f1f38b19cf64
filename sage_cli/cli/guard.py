"""How every `sage` command ends: each way out (an error, SIGINT, SIGTERM, a reader that closed
stdout) becomes at most one line on stderr and a documented exit code. Apart from the command
framework (sage_cli.cli.command) so that `sage run` can use it before typer is loaded."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from sage_cli.errors import SageError
from sage_cli.exitcodes import ExitCode
from sage_cli.operators.base import terminal_safe


class Terminated(BaseException):
    """Raised in the main thread when SIGTERM arrives."""


def fail(prog: str, err: SageError | str, code: int | None = None) -> int:
    """Print `sage <op>: error: <message>` and return the exit code."""
    # record content quoted in a message must not drive the terminal (ESC, CR, BEL) nor split
    # the one line (a record's value with a newline, quoted by an exception: found by fuzzing)
    message = terminal_safe(str(err).rstrip("\n")).replace("\n", "\\x0a") + "\n"
    try:
        sys.stderr.write(f"{prog}: error: {message}")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    if code is not None:
        return code
    return int(err.code) if isinstance(err, SageError) else int(ExitCode.FAILURE)


#: the last SIGINT/SIGTERM received: a library that turns any exception from a signal handler
#: into KeyboardInterrupt (watchfiles does) must still end a SIGTERM with 143
_last_signal: list[int] = []


def signal_handled() -> None:
    """A command that caught its KeyboardInterrupt and goes on (a REPL whose Ctrl-C stopped
    one answer): the signal must not end the command when its body returns."""
    _last_signal.clear()


def _on_signal(signum: int, frame: Any) -> None:
    """SIGINT -> KeyboardInterrupt, SIGTERM -> Terminated; held while stdout is written."""
    from sage_cli.cli.io import WRITE_GUARD

    _last_signal[:] = [signum]

    exc: type[BaseException] = KeyboardInterrupt if signum == signal.SIGINT else Terminated
    if not WRITE_GUARD.hold(exc):
        raise exc()


def _install_signal_handlers() -> dict[int, Any]:
    """Install `_on_signal` for SIGINT and SIGTERM (unless ignored); return what to restore."""
    previous: dict[int, Any] = {}
    _last_signal.clear()
    for sig in (signal.SIGINT, signal.SIGTERM):
        current = signal.getsignal(sig)
        if current is signal.SIG_IGN:
            continue
        try:
            previous[sig] = signal.signal(sig, _on_signal)
        except ValueError:  # not the main thread: leave signals to the main thread
            break
    return previous


def forget_signal() -> None:
    """A signal this process sent itself (a timeout's SIGINT) was handled: callers up the
    stack must not take it for the user's."""
    _last_signal.clear()


def reclaim_signals() -> None:
    """Inside `guarded`: take SIGINT and SIGTERM back after a library replaced their handlers
    (ray.init installs a SIGTERM handler that exits 15 after dumping a stack)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, _on_signal)


def silence_stdout() -> None:
    """After stdout is closed by the reader (`| head`), make later writes to it harmless."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
    except OSError:
        pass


def guarded(prog: str, body: Callable[[], None], on_stop: Callable[[], None] | None = None) -> int:
    """Run `body` and turn every way it can end into an exit code and at most one line on stderr.

    `on_stop` flushes complete output when the run is cut short by an error or a signal.
    """
    previous = _install_signal_handlers()
    try:
        body()
        if _last_signal:
            # The handler's exception can be lost: raised while modules are being imported, it
            # never reached us (tests/faults: SIGTERM in the first ~0.3 s of `sage index
            # build` let the whole build run and exit 0). The signal still ends the command.
            raise Terminated() if _last_signal == [signal.SIGTERM] else KeyboardInterrupt()
        return int(ExitCode.OK)
    except BrokenPipeError:
        silence_stdout()
        return int(ExitCode.OK)
    except KeyboardInterrupt:
        _stop(on_stop)
        if _last_signal == [signal.SIGTERM]:
            return int(ExitCode.TERMINATED)
        return int(ExitCode.INTERRUPTED)
    except Terminated:
        _stop(on_stop)
        return int(ExitCode.TERMINATED)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, no traceback
        _stop(on_stop)
        return report_error(prog, exc)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def report_error(prog: str, exc: Exception) -> int:
    """Print what ended `prog` as one line on stderr (a traceback too with SAGE_DEBUG=1) and
    return its exit code: a SageError's own, an operator error's, 75 for a full disk..."""
    if os.environ.get("SAGE_DEBUG") == "1":
        import traceback

        traceback.print_exception(exc)
    if isinstance(exc, SageError):
        return fail(prog, exc)
    from sage_cli.execution.driver import convert_operator_error, write_failure

    converted = convert_operator_error(exc)
    if converted is not None:
        return fail(prog, converted)
    if isinstance(exc, MemoryError):
        return fail(prog, "out of memory; use smaller batches (--batch-size) or inputs")
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        code, hint = write_failure(exc)
        return fail(prog, f"{where}{exc.strerror}{hint}", code)
    return fail(prog, f"{type(exc).__name__}: {exc} (set SAGE_DEBUG=1 for a traceback)")


def _stop(on_stop: Callable[[], None] | None) -> None:
    if on_stop is None:
        return
    try:
        on_stop()
    except BrokenPipeError:
        silence_stdout()
    except Exception:  # noqa: BLE001 - flushing on the way out must not hide the real error
        pass
