"""The shell around sage's operators: CLI assembly, NDJSON I/O, the driver, exit codes."""

import os as _os

__version__ = "0.1.0"

# A stage that bash started inside `sage run` finds its place in its pipeline first thing, while
# the commands beside it are still running (sage_cli.run.registry); nothing else pays for it.
if _os.environ.get("SAGE_RUN_DIR") and not _os.environ.get("SAGE_TRACE_STAGE"):
    from sage_cli.run.registry import note_place

    note_place()

# ... and ends when the `sage run` it belongs to is killed outright (sage_cli.run.lifeline)
if _os.environ.get("SAGE_RUN_LIFELINE"):
    from sage_cli.run.lifeline import hold

    hold(_os.environ["SAGE_RUN_LIFELINE"])
