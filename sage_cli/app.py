"""`sage`: the entry point. It imports nothing heavy itself: a keeper of `sage run --retries`
(SAGE_RUN_RETRIES) starts its worker before typer and the command group are loaded
(sage_cli.cli.group), since every stage's start-up is on its pipeline's critical path, and the
common `sage run` command lines start the run without typer (sage_cli.run.argv)."""

from __future__ import annotations

import sys
from typing import Any

#: what the command group module gives (kept importable from here)
_GROUP = ("app", "COMMANDS", "LazyGroup", "available_commands")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sage` script: usage errors become one line and exit 2."""
    args = sys.argv[1:] if argv is None else argv
    if argv is None and sys.stderr is None:
        _stderr_to_devnull()
    if argv is None:
        from sage_cli.run.keeper import keep, retries_asked

        retries = retries_asked()
        if retries is not None:  # SAGE_RUN_RETRIES=N: this process keeps a worker running
            return keep(args, retries)
    if args and args[0] == "run":
        from sage_cli.run.argv import quick_options

        options = quick_options(args[1:])
        if options is not None:
            from sage_cli.run.launch import launch

            code = launch(**options)
            if argv is None:
                _exit_now(code)
            return code
    from sage_cli.cli.group import run

    return run(args)


def _stderr_to_devnull() -> None:
    """Started with descriptor 2 closed (`2>&-`): what sage would say goes to /dev/null, as
    with `2>/dev/null`, and the exit status still tells; every message would otherwise fail
    on a missing sys.stderr and turn a run that went well into exit 1."""
    import os

    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        if fd != 2:
            os.dup2(fd, 2)
            os.close(fd)
        sys.stderr = open(2, "w", errors="backslashreplace", closefd=False)  # noqa: SIM115
    except OSError:
        pass


def _exit_now(code: int) -> None:
    """End this process at once when nothing is left to finish but freeing memory (no thread
    but this one, no atexit callback, its output flushed): the interpreter's own teardown
    took ~8 ms after every `sage run`, on the run's wall time. Otherwise return, and Python
    exits as usual."""
    import atexit
    import os

    threading = sys.modules.get("threading")
    if threading is not None and threading.active_count() > 1:
        return
    if atexit._ncallbacks():  # noqa: SLF001 - the one way to ask
        return
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:  # None: closed before Python started (`>&-`)
                stream.flush()
    except (OSError, ValueError):
        return  # a closed or broken stream: Python's own exit says so as usual
    os._exit(code)


def __getattr__(name: str) -> Any:
    if name in _GROUP:
        from sage_cli.cli import group

        return getattr(group, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
