"""The stage runtime: what runs beside an operator, wherever it lives (this process, a
`--workers` process, a Ray actor). It builds and sets up the operator once and runs one batch at
a time, retrying a failed batch record by record so one bad record never loses the rest.

A batch turns into *segments*, in the order the Driver must write or judge them:

    ("out", records)                         records to write
    ("err", record, origin, line, exception)  a record that failed: the Driver's policy judges it
    ("raise", exception)                     the operator cannot go on (a missing model...)

The error policy, counters, traces and output stay with the Driver (sage_cli.execution.driver):
the runtime only reports.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from sage_cli.operators.base import (
    Operator,
    OperatorError,
    OptionError,
    OutputFailed,
    Record,
    RecordError,
    ResourceUnavailable,
    TransientError,
)

Segment = tuple[Any, ...]

#: exceptions that end the stage at once: never retried record by record
FATAL = (ResourceUnavailable, OutputFailed, KeyboardInterrupt)


class RemoteError(Exception):
    """An exception raised in another process that could not be sent back as itself."""


def portable_error(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling, else an exception of the nearest operator error class
    with the same message, so the Driver's policy judges it the same way."""
    import pickle  # only where a batch runs in another process: not on every stage's start-up

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any pickling failure: fall back to the message
        pass
    message = str(exc) or type(exc).__name__
    for cls in (TransientError, RecordError, ResourceUnavailable, OptionError, OperatorError):
        if isinstance(exc, cls):
            return cls(message)
    return RemoteError(message)


def run_batch(
    op: Operator,
    origin: str,
    batch: list[Record],
    lines: Sequence[int],
    stop_at_error: bool = False,
) -> list[Segment]:
    """Process one batch; on failure retry it record by record (a batch of one is not re-run:
    that would only repeat the failure and its timeout). `stop_at_error`: stop at the first
    failed record (`--on-error fail` ends the stage there; nothing after it is processed)."""
    try:
        out = op.process(batch)
    except FATAL:
        raise
    except Exception as exc:  # noqa: BLE001 - a failed batch is retried, a failed record judged
        if len(batch) == 1:
            return [("err", batch[0], origin, lines[0], exc)]
    else:
        return [("out", out)]
    segments: list[Segment] = []
    pending: list[Record] = []
    for i, record in enumerate(batch):
        try:
            pending.extend(op.process([record]))
        except FATAL:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of one record is that record's
            if pending:
                segments.append(("out", pending))
                pending = []
            segments.append(("err", record, origin, lines[i], exc))
            if stop_at_error:
                return segments
    if pending:
        segments.append(("out", pending))
    return segments


class StageRuntime:
    """One copy of a stage's operator, away from the Driver (a worker process, a Ray actor):
    built from its factory and set up once; every answer is picklable."""

    def __init__(self, factory: Callable[[], Operator], stop_at_error: bool) -> None:
        self.op = factory()
        self.stop_at_error = stop_at_error

    def setup(self) -> None:
        self.op.setup()

    def run(
        self, origin: str, batch: list[Record], lines: Sequence[int]
    ) -> tuple[list[Segment], float, bool]:
        """One batch: its segments (exceptions made portable), the seconds it took, and whether
        the operator wants no more input."""
        t0 = time.perf_counter()
        try:
            segments = run_batch(self.op, origin, batch, lines, self.stop_at_error)
        except BaseException as exc:  # noqa: BLE001 - ResourceUnavailable and the like
            segments = [("raise", exc)]
        portable = [
            (s[0], s[1], s[2], s[3], portable_error(s[4]))
            if s[0] == "err"
            else (("raise", portable_error(s[1])) if s[0] == "raise" else s)
            for s in segments
        ]
        return portable, time.perf_counter() - t0, bool(self.op.done)

    def tick(self, now: float) -> list[Record]:
        return self.op.tick(now)

    def close(self) -> list[Record]:
        return self.op.close()
