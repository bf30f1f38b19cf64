"""The one driver that runs every operator (DESIGN §4).

It owns batching, the error policy, `_error` pass-through, per-record retry of a failed batch,
ordering and counters. Operators never re-implement any of these.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson

from sage_cli.errors import DataError, SageError, TempFailError, UnavailableError, UsageError
from sage_cli.exitcodes import ExitCode
from sage_cli.io import BadLine, RecordReader, RecordWriter, dump_record
from sage_cli.operators.base import (
    DISK_FULL_HINT,
    Operator,
    OptionError,
    OutputFailed,
    Record,
    RecordError,
    ResourceUnavailable,
    TransientError,
)


class ErrorMode(StrEnum):
    fail = "fail"
    skip = "skip"
    emit = "emit"


@dataclass
class Stats:
    """Counters a stage keeps for progress and traces."""

    records_in: int = 0
    records_out: int = 0
    errors: int = 0
    skipped: int = 0
    batches: int = 0
    busy_seconds: float = 0.0
    started: float = field(default_factory=time.monotonic)


class ErrorPolicy:
    """Applies `--on-error` and `--errors FILE` to a bad line or a failed record."""

    #: what a `fail` message adds to say how to go on (the Python API says it in its own words)
    go_on_hint = " (--on-error skip|emit to go on)"

    def __init__(
        self,
        stage: str,
        mode: ErrorMode = ErrorMode.fail,
        dead_letter: str | None = None,
        stats: Stats | None = None,
    ) -> None:
        self.stage = stage
        self.mode = ErrorMode(mode)
        self.dead_letter = dead_letter
        self.stats = stats if stats is not None else Stats()
        self._dead_fh: Any = None

    def _record_dead(self, entry: Record) -> None:
        if self.dead_letter is None:
            return
        if self._dead_fh is None:
            try:
                self._dead_fh = open(self.dead_letter, "ab")  # noqa: SIM115 - kept open for the run
            except OSError as exc:
                raise SageError(
                    f"--errors {self.dead_letter}: cannot open: {exc.strerror}"
                ) from None
        try:
            self._dead_fh.write(dump_record(entry))  # any record read can be written (io.py)
            self._dead_fh.flush()  # a dead letter must survive a crash of this process
        except OSError as exc:  # a full disk: stop, a dead letter must not be lost silently
            fh, self._dead_fh = self._dead_fh, None
            try:
                fh.close()
            except OSError:
                pass
            code, hint = write_failure(exc)
            raise SageError(
                f"--errors {self.dead_letter}: cannot write: {exc.strerror or exc}{hint}", code
            ) from None

    def bad_line(self, bad: BadLine) -> list[Record]:
        """A line that is not a JSON object. Returns what to write in its place."""
        entry = {
            "stage": self.stage,
            "origin": bad.origin,
            "line": bad.line,
            "error": bad.reason,
            "raw": bad.raw_text(),
        }
        return self._apply(entry, bad.message(), ExitCode.DATA, {"_error": entry})

    def bad_record(
        self, record: Record, origin: str, line: int, exc: BaseException
    ) -> list[Record]:
        """A record the operator could not process."""
        reason = str(exc) or type(exc).__name__
        # a record orjson cannot write (nested past 254 levels, as JSON allows) is bad data
        unwritable = isinstance(exc, orjson.JSONEncodeError)
        if unwritable:
            reason = f"record cannot be written as JSON: {reason}"
        entry = {"stage": self.stage, "origin": origin, "line": line, "error": reason}
        dead = dict(entry, raw=record)
        code = ExitCode.DATA if unwritable or isinstance(exc, RecordError) else ExitCode.FAILURE
        if isinstance(exc, TransientError):
            code = ExitCode.TEMPFAIL
        emitted = dict(record)
        emitted["_error"] = entry
        return self._apply(dead, f"{origin}:{line}: {reason}", code, emitted)

    def _apply(self, dead: Record, message: str, code: ExitCode, emitted: Record) -> list[Record]:
        self.stats.errors += 1
        self._record_dead(dead)
        if self.mode is ErrorMode.fail:
            hint = "" if self.dead_letter else self.go_on_hint
            raise SageError(message + hint, code)
        if self.mode is ErrorMode.skip:
            self.stats.skipped += 1
            return []
        return [emitted]

    def close(self) -> None:
        if self._dead_fh is not None:
            self._dead_fh.close()
            self._dead_fh = None


def write_failure(exc: OSError) -> tuple[ExitCode, str]:
    """The exit code and message hint for a failed write: 75 and what to do for a full disk or
    quota (room made, the same command works), else 1 and no hint."""
    import errno

    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ExitCode.TEMPFAIL, DISK_FULL_HINT
    return ExitCode.FAILURE, ""


def convert_operator_error(exc: Exception) -> SageError | None:
    """Map an operator-level exception that stops the stage to a user-facing SageError."""
    if isinstance(exc, OptionError):
        return UsageError(str(exc))
    if isinstance(exc, ResourceUnavailable):
        return UnavailableError(str(exc))
    if isinstance(exc, TransientError):
        return TempFailError(str(exc))
    if isinstance(exc, OutputFailed):  # disk full: 75 (a retry after freeing space), else 1
        return TempFailError(str(exc)) if exc.temporary else SageError(str(exc))
    if isinstance(exc, RecordError):
        return DataError(str(exc))
    return None


class Driver:
    """Feeds records through one operator in batches and writes what it returns."""

    def __init__(
        self,
        op: Operator,
        writer: RecordWriter,
        policy: ErrorPolicy,
        batch_size: int = 256,
        on_batch: Callable[[Stats], None] | None = None,
    ) -> None:
        self.op = op
        self.writer = writer
        self.policy = policy
        self.batch_size = max(1, batch_size)
        self.stats = policy.stats
        self.on_batch = on_batch
        #: set by run_operator under `sage run` (sage_cli.trace.Tracer): one event per batch
        self.tracer: Any = None
        #: set by run_operator with SAGE_ENVELOPE=1 (sage_cli.envelope.Envelope): `_sage` per record
        self.envelope: Any = None

    # -- the public entry points -------------------------------------------------------------

    def run_reader(self, reader: RecordReader) -> None:
        """Run the operator over everything `reader` yields, then close it."""
        self.op.setup()
        for block in reader.blocks():
            self.feed_block(block.origin, block.first_line, block.items, block.lines, block.clean)
            if self.op.done:
                break
            self.writer.maybe_flush()
        self.finish()

    def run_records(self, records: Iterable[Record], origin: str = "input") -> None:
        """Run the operator over records that did not come from NDJSON (a source, a table).

        `records` may also yield a BadLine (the policy handles it, with its own FILE:LINE) and
        None, which means "input is idle now": what is pending is processed and flushed, so a
        live source (`source --watch`, `merge` over FIFOs) never holds output back.
        """
        self.op.setup()
        batch: list[Record] = []
        line = 0
        it = iter(records)
        while True:
            try:
                record = next(it)
            except StopIteration:
                break
            except BaseException:
                # The source failed (an unreadable file, Ctrl-C): what it produced before the
                # failure still goes through, then the failure ends the run.
                if batch and not self.op.done:
                    self.feed_block(origin, line + 1, batch, None, False)
                raise
            if record is None:
                if batch:
                    self.feed_block(origin, line + 1, batch, None, False)
                    line += len(batch)
                    batch = []
                if self.op.done:
                    break
                self.idle()
                continue
            batch.append(record)
            if len(batch) >= self.batch_size:
                self.feed_block(origin, line + 1, batch, None, False)
                line += len(batch)
                batch = []
                self.writer.maybe_flush()
                if self.op.done:
                    break
        if batch and not self.op.done:
            self.feed_block(origin, line + 1, batch, None, False)
        self.finish()

    def idle(self) -> None:
        """Input is idle: emit what time-driven operators have ready, then flush."""
        out = self.op.tick(time.time())
        if out:
            self._write(out)
        self.writer.flush()

    def finish(self) -> None:
        self._write(self.op.close())
        self.writer.flush()

    # -- batching ----------------------------------------------------------------------------

    def feed_block(
        self,
        origin: str,
        first_line: int,
        items: list[Any],
        lines: Sequence[int] | None,
        clean: bool,
    ) -> None:
        """Process one block of items read together.

        A clean block holds only records without `_error`, numbered from `first_line`: it is
        cut into batches with no per-record checks. Anything else goes item by item.
        """
        bs = self.batch_size
        if clean:
            n = len(items)
            for start in range(0, n, bs):
                part = items if n <= bs else items[start : start + bs]
                self._run_batch(
                    origin, part, range(first_line + start, first_line + start + len(part))
                )
                if self.op.done:
                    return
            return
        if lines is None:
            lines = range(first_line, first_line + len(items))
        batch: list[Record] = []
        batch_lines: list[int] = []
        for item, line in zip(items, lines, strict=True):
            if type(item) is dict and "_error" not in item:
                batch.append(item)
                batch_lines.append(line)
                if len(batch) >= bs:
                    self._run_batch(origin, batch, batch_lines)
                    batch, batch_lines = [], []
                    if self.op.done:
                        return
                continue
            if batch:
                self._run_batch(origin, batch, batch_lines)
                batch, batch_lines = [], []
                if self.op.done:
                    return
            if isinstance(item, BadLine):
                self._write(self.policy.bad_line(item))
            else:
                self.stats.records_in += 1
                self._write([item])  # an _error record passes through untouched
        if batch:
            self._run_batch(origin, batch, batch_lines)

    def _run_batch(self, origin: str, batch: list[Record], lines: Sequence[int]) -> None:
        stats = self.stats
        stats.records_in += len(batch)
        stats.batches += 1
        t0 = time.perf_counter()
        try:
            out = self.op.process(batch)
        except (ResourceUnavailable, OutputFailed, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - a failed batch is retried, a failed record judged
            if len(batch) == 1:  # re-running it would only repeat the failure (and its timeout)
                out = self.policy.bad_record(batch[0], origin, lines[0], exc)
            else:
                out = self._one_by_one(origin, batch, lines)
        t1 = time.perf_counter()
        stats.busy_seconds += t1 - t0
        if self.tracer is not None:
            self.tracer.batch(batch, out, t0, t1)
        if self.envelope is not None:
            self.envelope.stamp(out, t1 - t0, len(batch))
        self._write(out)
        # a slow operator over a file never blocks on input: flush at least every ~100 ms
        self.writer.maybe_flush()
        if self.on_batch is not None:
            self.on_batch(stats)

    def _one_by_one(self, origin: str, batch: list[Record], lines: Sequence[int]) -> list[Record]:
        """Retry a failed batch record by record; the policy handles the records that fail."""
        out: list[Record] = []
        for i, record in enumerate(batch):
            try:
                out.extend(self.op.process([record]))
            except (ResourceUnavailable, OutputFailed, KeyboardInterrupt):
                raise
            except Exception as exc:  # noqa: BLE001 - any failure of one record is that record's
                self._write(out)  # what came before the bad record is written first
                out = []
                out.extend(self.policy.bad_record(record, origin, lines[i], exc))
        return out

    def _write(self, records: list[Record]) -> None:
        if records:
            self.stats.records_out += len(records)
            self.writer.write(records)
