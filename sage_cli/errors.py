"""User-facing errors: one line on stderr, a documented exit code, no traceback."""

from __future__ import annotations

from sage_cli.exitcodes import ExitCode


class SageError(Exception):
    """An error the user can fix. `str(err)` is the one line printed after `sage <op>: error: `."""

    code: ExitCode = ExitCode.FAILURE

    def __init__(self, message: str, code: ExitCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class UsageError(SageError):
    code = ExitCode.USAGE


class DataError(SageError):
    code = ExitCode.DATA


class UnavailableError(SageError):
    code = ExitCode.UNAVAILABLE


class TempFailError(SageError):
    code = ExitCode.TEMPFAIL
