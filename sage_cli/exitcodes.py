"""The exit codes every sage command uses (documented in the README)."""

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1  # the operator itself failed
    USAGE = 2  # bad flags or arguments
    DATA = 65  # bad input data (EX_DATAERR)
    UNAVAILABLE = 69  # missing or corrupt model or index (EX_UNAVAILABLE)
    TEMPFAIL = 75  # temporary failure, a retry may help (EX_TEMPFAIL)
    INTERRUPTED = 130  # SIGINT
    TERMINATED = 143  # SIGTERM
