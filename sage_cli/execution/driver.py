"""The one Driver that runs every operator (DESIGN §4), whoever calls it and wherever its
batches run.

It owns batching, the error policy (`--on-error`, `--errors`), `_error` pass-through, bad lines,
ordering, counters, the trace, the `_sage` envelope, timer ticks and the end of input. Where a
batch runs is its executor's business (sage_cli.execution.executor: inline, a process pool, Ray
actors); the per-record retry of a failed batch runs beside the operator
(sage_cli.execution.runtime.run_batch) and comes back as segments the Driver judges here.
Operators and executors never re-implement any of this.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson

from sage_cli.cli.io import BadLine, Block, RecordReader, RecordWriter, dump_record
from sage_cli.errors import DataError, SageError, TempFailError, UnavailableError, UsageError
from sage_cli.execution.executor import Executor, InlineExecutor, Task
from sage_cli.execution.runtime import Segment
from sage_cli.exitcodes import ExitCode
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
    tokens: int = 0  # model tokens (`usage`) of the records this stage produced
    started: float = field(default_factory=time.monotonic)


def plain_text_hint(bad: BadLine) -> str:
    """How to read text, for a bad first line that starts like prose rather than JSON (a
    letter: not a bracket, quote, digit or sign): text given where records were expected.
    Empty for any other bad line."""
    textual = bad.reason.startswith("invalid JSON") and bad.raw.lstrip()[:1].isalpha()
    if bad.line != 1 or not textual:
        return ""
    if bad.origin == "stdin":
        return "; for lines of plain text, put `sage source - -R |` in front"
    import shlex

    return f"; for a file of plain text, read it with `sage source {shlex.quote(bad.origin)} -R`"


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
        #: a keeper's restarted worker meets again lines a dead one met (uncommitted, or
        #: replayed to rebuild state): the dead letter's size when the keeper's first worker
        #: opened it; an entry (stage, origin, line) already written since is not written again
        self.written_from: int | None = None
        #: called with the dead letter's size when it is opened (a keeper's worker tells its
        #: keeper, which gives it to the workers after it as `written_from`)
        self.on_open: Callable[[int], None] | None = None
        self._written: set[tuple[Any, Any, Any]] | None = None

    def _record_dead(self, entry: Record) -> None:
        if self.dead_letter is None:
            return
        if self._dead_fh is None:
            try:
                mode = "ab" if self.written_from is None else "ab+"
                self._dead_fh = open(self.dead_letter, mode)  # noqa: SIM115 - kept open for the run
            except OSError as exc:
                raise SageError(
                    f"--errors {self.dead_letter}: cannot open: {exc.strerror}"
                ) from None
            if self.written_from is not None:
                self._written = set(map(_line_key, _entries(self._dead_fh, self.written_from)))
            elif self.on_open is not None:
                self.on_open(self._dead_fh.seek(0, 2))
        if self._written is not None:
            key = _line_key(entry)
            if key in self._written:
                return
            self._written.add(key)
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
        # text given where records were expected: the fix is a source, not an error policy
        message = bad.message() + plain_text_hint(bad)
        return self._apply(entry, message, ExitCode.DATA, {"_error": entry})

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


def _line_key(entry: Any) -> tuple[Any, Any, Any]:
    if not isinstance(entry, dict):
        return (None, None, None)
    return (entry.get("stage"), entry.get("origin"), entry.get("line"))


def _entries(fh: Any, start: int) -> Iterator[Any]:
    """The dead letter's entries from byte `start` on (lines that do not parse are passed
    over)."""
    fh.seek(start)
    for line in fh:
        try:
            yield orjson.loads(line)
        except orjson.JSONDecodeError:
            continue


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


@dataclass(slots=True)
class _Slot:
    """A place in the output: a batch sent to the executor (`batch` set) or records the Driver
    made itself (an `_error` record passed through, a bad line), with its segments once known."""

    batch: list[Record] | None
    entered: float  # when its records entered the stage (perf_counter)
    segments: list[Segment] | None = None
    busy: float = 0.0
    done: bool = False
    last_line: int = 0  # the last input line whose effects this slot completes (0: none)
    first_line: int = 0  # its batch's first input line


def usage_tokens(records: list[Record]) -> int:
    """Model tokens (prompt + completion) the records' `usage` reports."""
    total = 0
    for r in records:
        usage = r.get("usage")
        if type(usage) is dict:
            total += int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)
    return total


def owned_by(exc: BaseException, stage: str) -> BaseException:
    """Name the stage an error ended (`sage map`), unless a later stage already did: a
    pipeline of Drivers (Ray) reports the stage that failed, not the one that fed it."""
    if isinstance(exc, Exception) and getattr(exc, "stage", None) is None:
        try:
            exc.stage = stage  # type: ignore[attr-defined]
        except AttributeError:
            pass
    return exc


def split_blocks(blocks: Iterable[Block], line: int) -> Iterable[Block]:
    """`blocks` with the one that holds both `line` and the line after it cut in two there, so
    no batch mixes lines up to `line` with later ones."""
    for block in blocks:
        lines: Sequence[int] = (
            block.lines
            if block.lines is not None
            else range(block.first_line, block.first_line + len(block.items))
        )
        if not lines or lines[0] > line or lines[-1] <= line:
            yield block
            continue
        cut = next(i for i, n in enumerate(lines) if n > line)
        head = list(lines[:cut]) if block.lines is not None else None
        tail = list(lines[cut:]) if block.lines is not None else None
        items = block.items
        yield Block(block.origin, block.first_line, items[:cut], head, block.clean)
        yield Block(block.origin, lines[cut], items[cut:], tail, block.clean)


class Driver:
    """Feeds records through one operator in batches and writes what comes back.

    `executor` runs the batches (default: inline, in this process). `ordered=False` writes a
    batch's output as soon as it is back (an executor with several copies). `writer` is the
    stage's output: stdout, or the next stage's Driver (sage_cli.execution.ray).
    """

    def __init__(
        self,
        op: Operator,
        writer: RecordWriter,
        policy: ErrorPolicy,
        batch_size: int = 256,
        on_batch: Callable[[Stats], None] | None = None,
        *,
        executor: Executor | None = None,
        ordered: bool = True,
    ) -> None:
        self.op = op  # this process's copy: its facts (tick_interval...); set up only inline
        self.writer = writer
        self.policy = policy
        self.batch_size = max(1, batch_size)
        self.stats = policy.stats
        self.on_batch = on_batch
        if executor is None:
            executor = InlineExecutor(op, stop_at_error=policy.mode is ErrorMode.fail)
        self.executor = executor
        self.ordered = ordered
        self.max_pending = max(1, executor.capacity)
        #: set under `sage run` (sage_cli.observability.trace.Tracer): one event per batch
        self.tracer: Any = None
        #: set with SAGE_ENVELOPE=1 (sage_cli.observability.envelope.Envelope): `_sage` per record
        self.envelope: Any = None
        #: set in a keeper's worker (sage_cli.run.keeper): called with the last input line whose
        #: effects are complete, right after that line's outputs are written (ordered only)
        self.committer: Callable[[int], None] | None = None
        #: a restarted worker of a stateful operator replays input lines 1..silent_through to
        #: rebuild its state, writing none of their outputs (its keeper forwarded them already)
        self.silent_through = 0
        #: the operator wants no more input (`head`), or the stage after this one does
        self.done = False
        self._seq = 0
        self._slots: deque[_Slot] = deque()  # ordered: every slot not written yet
        self._in_flight: dict[int, _Slot] = {}
        self._lines = 0  # records fed by feed_records (the line numbers of a later stage)
        self._started = False
        #: only a stage that produces `usage` counts tokens (later stages pass it through)
        self._counts_tokens = "usage" in getattr(op, "produces", {})

    # -- the public entry points -------------------------------------------------------------

    def observe(self, tracer: Any = None, envelope: Any = None) -> None:
        """Trace every batch to `tracer` (observability.trace.Tracer, started here) and stamp
        every record with `envelope` (observability.envelope.Envelope); None: not this one."""
        self.envelope = envelope
        self.tracer = tracer
        if tracer is not None:
            tracer.start(self.stats)

    def start(self) -> None:
        """Set the operator up (inline) or start its copies (workers, actors); once."""
        if not self._started:
            self._started = True
            self.executor.start()

    def run_reader(self, reader: RecordReader) -> None:
        """Run the operator over everything `reader` yields, then close it."""
        self.start()
        blocks: Iterable[Block] = reader.blocks()
        if self.silent_through:
            blocks = split_blocks(blocks, self.silent_through)
        for block in blocks:
            self.feed_block(block.origin, block.first_line, block.items, block.lines, block.clean)
            if self.done:
                break
            self.writer.maybe_flush()
        self.finish()

    def run_records(self, records: Iterable[Record], origin: str = "input") -> None:
        """Run the operator over records that did not come from NDJSON (a source, a table).

        `records` may also yield a BadLine (the policy handles it, with its own FILE:LINE) and
        None, which means "input is idle now": what is pending is processed and flushed, so a
        live source (`source --watch`, `merge` over FIFOs) never holds output back.
        """
        self.start()
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
                if batch and not self.done:
                    self.feed_block(origin, line + 1, batch, None, False)
                    self.drain()
                raise
            if record is None:
                if batch:
                    self.feed_block(origin, line + 1, batch, None, False)
                    line += len(batch)
                    batch = []
                if self.done:
                    break
                self.idle()
                continue
            batch.append(record)
            if len(batch) >= self.batch_size:
                self.feed_block(origin, line + 1, batch, None, False)
                line += len(batch)
                batch = []
                self.writer.maybe_flush()
                if self.done:
                    break
        if batch and not self.done:
            self.feed_block(origin, line + 1, batch, None, False)
        self.finish()

    def feed_records(self, records: list[Record]) -> None:
        """Records from the stage before (a pipeline of Drivers), numbered as this stage's
        stdin lines."""
        if self.done or not records:
            return
        first = self._lines + 1
        self._lines += len(records)
        self.feed_block("stdin", first, records, None, False)

    def idle(self) -> None:
        """Input is idle: write everything in flight, emit what a time-driven operator has
        ready (a window), then flush, so nothing is held back while input waits."""
        self.drain()
        if not self.done:
            try:
                out = self.executor.tick(time.time())
            except Exception as exc:
                raise owned_by(exc, self.policy.stage) from None
            if out:
                self._write(out)
        self.writer.flush()
        if self.tracer is not None:  # a live view sees what passed before the wait
            self.tracer.flush()

    def finish(self) -> None:
        """End of input: write everything in flight and what the operator still holds."""
        self.drain()
        try:
            out = self.executor.close()
        except Exception as exc:
            raise owned_by(exc, self.policy.stage) from None
        self._write(out)
        self.writer.flush()

    def drain(self) -> None:
        """Wait for every batch in flight and write everything held back."""
        while self._in_flight:
            self._collect(wait=True)
        self._emit_ready()

    def abandon(self) -> None:
        """The run ends early: drop the operator's partial output (a sink's temporary file)."""
        self.executor.abandon()

    def shutdown(self) -> None:
        """Stop the executor's copies (processes, actors), however the run ended."""
        self.executor.shutdown()

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
        entered = time.perf_counter()
        if clean:
            n = len(items)
            for start in range(0, n, bs):
                part = items if n <= bs else items[start : start + bs]
                self._submit(
                    origin, part, range(first_line + start, first_line + start + len(part)), entered
                )
                if self.done:
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
                    self._submit(origin, batch, batch_lines, entered)
                    batch, batch_lines = [], []
                    if self.done:
                        return
                continue
            if batch:
                self._submit(origin, batch, batch_lines, entered)
                batch, batch_lines = [], []
                if self.done:
                    return
            if isinstance(item, BadLine):
                self._local([("bad", item)], entered, line)
            else:
                self.stats.records_in += 1
                self._local([("out", [item])], entered, line)  # an _error record: untouched
        if batch:
            self._submit(origin, batch, batch_lines, entered)

    def _submit(
        self, origin: str, batch: list[Record], lines: Sequence[int], entered: float
    ) -> None:
        self.stats.records_in += len(batch)
        self.stats.batches += 1
        seq = self._seq
        self._seq += 1
        task = Task(seq, origin, batch, lines)
        if not self._in_flight and not self._slots:  # nothing ahead of it: maybe run it now
            try:
                result = self.executor.run_now(task)
            except Exception as exc:
                raise owned_by(exc, self.policy.stage) from None
            if result is not None:
                self.stats.busy_seconds += result.busy
                slot = _Slot(batch, entered, result.segments, result.busy, result.done)
                slot.first_line, slot.last_line = lines[0], lines[-1]
                self._emit(slot)
                return
        slot = _Slot(batch, entered)
        slot.first_line, slot.last_line = lines[0], lines[-1]
        self._in_flight[seq] = slot
        if self.ordered:
            self._slots.append(slot)
        try:
            self.executor.submit(task)
        except Exception as exc:
            raise owned_by(exc, self.policy.stage) from None
        self._collect(wait=False)
        while (len(self._slots) if self.ordered else len(self._in_flight)) >= self.max_pending:
            self._collect(wait=True)

    def _local(self, segments: list[Segment], entered: float, line: int = 0) -> None:
        """Records the Driver makes itself: in their place behind batches not written yet."""
        slot = _Slot(None, entered, segments)
        slot.last_line = line
        if self.ordered and self._slots:
            self._slots.append(slot)
            return
        if not self.ordered and segments[0][0] == "bad":
            self.drain()  # what `--on-error fail` reports and what was written must match
        self._emit(slot)

    def _collect(self, wait: bool) -> None:
        if self._in_flight:
            try:
                finished = self.executor.results(wait)
            except Exception as exc:
                raise owned_by(exc, self.policy.stage) from None
            for result in finished:
                slot = self._in_flight.pop(result.seq)
                slot.segments = result.segments
                slot.busy = result.busy
                slot.done = result.done
                self.stats.busy_seconds += result.busy
                if not self.ordered:
                    self._emit(slot)
        self._emit_ready()

    def _emit_ready(self) -> None:
        slots = self._slots
        while slots and slots[0].segments is not None:
            self._emit(slots.popleft())

    def _emit(self, slot: _Slot) -> None:
        """Judge a slot's segments with the policy, then trace, stamp and write its output."""
        batch = slot.batch
        if self.done:
            return  # the operator wanted no more input: nothing after that point is written
        segments = slot.segments
        assert segments is not None
        if len(segments) == 1 and segments[0][0] == "out":
            out = segments[0][1]
        else:
            out = []
            try:
                for seg in segments:
                    kind = seg[0]
                    if kind == "out":
                        out.extend(seg[1])
                    elif kind == "err":
                        out.extend(self.policy.bad_record(seg[1], seg[2], seg[3], seg[4]))
                    elif kind == "bad":
                        out.extend(self.policy.bad_line(seg[1]))
                    else:  # ("raise", exception): the operator cannot go on
                        raise seg[1]
            except Exception as exc:
                self._write(out)  # what came before the failure is written first
                raise owned_by(exc, self.policy.stage) from None
        # a replayed line (a stateful worker rebuilding its state): written and traced before
        replayed = bool(self.silent_through) and slot.last_line <= self.silent_through
        if batch is not None:
            tokens = usage_tokens(out) if self._counts_tokens and out else 0
            self.stats.tokens += tokens
            if self.tracer is not None and not replayed:
                self.tracer.batch(
                    batch,
                    out,
                    slot.entered,
                    time.perf_counter(),
                    tokens,
                    slot.first_line,
                    self.stats.records_out,
                )
            if self.envelope is not None:
                self.envelope.stamp(out, slot.busy, len(batch))
        if not replayed:
            self._write(out)
        if self.committer is not None and slot.last_line:
            self.committer(slot.last_line)
        if slot.done:
            self.done = True
        if batch is not None:
            # a slow operator over a file never blocks on input: flush at least every ~100 ms
            self.writer.maybe_flush()
            if self.on_batch is not None:
                self.on_batch(self.stats)

    def _write(self, records: list[Record]) -> None:
        if records:
            self.stats.records_out += len(records)
            self.writer.write(records)
            if self.writer.done:  # the next stage wants no more (a pipeline of Drivers)
                self.done = True
