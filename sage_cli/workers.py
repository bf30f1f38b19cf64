"""`--workers N`: one stateless operator in N worker processes (DESIGN §4, issue 5).

Each worker rebuilds the operator from an OperatorFactory (the command's build function and its
parsed flags), calls `setup()` once (a model loads once per worker), then runs the shared Driver
over every batch it is sent. The error policy stays in the parent: a record that fails inside a
worker comes back as an `err` segment, in its place among the outputs, and the parent's
ErrorPolicy judges it exactly as the one-process driver would (`replay`). The Ray engine uses
the same BatchRunner and `replay`.

Batches go to the least busy worker; at most `max_pending` batches are submitted and not yet
written (backpressure), and output is written in input order unless `--unordered`.
"""

from __future__ import annotations

import itertools
import os
import pickle
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from sage_cli.driver import Driver, ErrorMode, ErrorPolicy, Stats
from sage_cli.errors import SageError
from sage_cli.exitcodes import ExitCode
from sage_cli.io import RecordWriter
from sage_cli.operators.base import (
    Operator,
    OperatorError,
    OptionError,
    Record,
    RecordError,
    ResourceUnavailable,
    TransientError,
)

#: what a batch turns into: ("out", records) or ("err", record, origin, line, exception),
#: in the order the one-process driver would have written or judged them
Segment = tuple[Any, ...]

#: batches sent to one worker before it must answer; 2 keeps a worker busy while the parent
#: reads its last answer
PER_WORKER = 2


# -- the worker side (also used by Ray actors) ----------------------------------------------


class RemoteError(Exception):
    """An exception raised in a worker that could not be sent back as itself."""


def portable_error(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling, else an exception of the nearest operator error class
    with the same message, so the parent's policy judges it the same way."""
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


class _Collector(RecordWriter):
    """The worker-side Driver's writer: it keeps segments instead of writing."""

    def __init__(self) -> None:  # no fd: nothing is written
        self.segments: list[Segment] = []
        self.records_written = 0

    def write(self, records: list[Record]) -> None:
        if records:
            self.segments.append(("out", records))

    def maybe_flush(self) -> None:
        pass

    def flush(self) -> None:
        pass


class _DeferredPolicy(ErrorPolicy):
    """The worker-side policy: a failed record becomes an `err` segment for the parent."""

    def __init__(self, collector: _Collector) -> None:
        super().__init__("worker", ErrorMode.emit, None, Stats())
        self.collector = collector

    def bad_record(
        self, record: Record, origin: str, line: int, exc: BaseException
    ) -> list[Record]:
        self.collector.segments.append(("err", record, origin, line, portable_error(exc)))
        return []


class BatchRunner:
    """Runs the shared Driver over one batch at a time, away from the process that owns the
    error policy and the output. Built once per worker or actor."""

    def __init__(self, op: Operator, batch_size: int) -> None:
        self.collector = _Collector()
        self.driver = Driver(op, self.collector, _DeferredPolicy(self.collector), batch_size)

    def setup(self) -> None:
        self.driver.op.setup()

    def run(
        self, origin: str, batch: list[Record], lines: Sequence[int]
    ) -> tuple[list[Segment], float]:
        """Process one batch; return its segments and the seconds it took."""
        self.collector.segments = []
        t0 = time.perf_counter()
        first = lines[0] if len(lines) else 1
        # A batch holds records without `_error` only (the parent's driver cut it), so the
        # driver gives it to the operator whole.
        self.driver.feed_block(origin, first, batch, lines, False)
        return self.collector.segments, time.perf_counter() - t0

    def close(self) -> list[Record]:
        return self.driver.op.close()


def replay(
    segments: list[Segment], write: Callable[[list[Record]], None], policy: ErrorPolicy
) -> None:
    """Write a batch's segments in order; the policy judges each failed record (in `fail`
    mode it raises after what came before was written)."""
    for seg in segments:
        if seg[0] == "out":
            write(seg[1])
        elif seg[0] == "err":
            _, record, origin, line, exc = seg
            write(policy.bad_record(record, origin, line, exc))
        else:  # ("raise", exception): the operator cannot go on
            raise seg[1]


def _watch_parent(parent: int) -> None:
    """End this worker when the process that started it is gone (killed with SIGKILL)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def _worker_main(conn: Any, factory: Any, batch_size: int, parent: int) -> None:
    """A worker process: build and set up the operator once, then answer batches."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C for everyone
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    try:
        runner = BatchRunner(factory(), batch_size)
        runner.setup()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which stops
        conn.send(("fatal", None, portable_error(exc)))
        return
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if message[0] == "close":
            try:
                conn.send(("closed", None, runner.close()))
            except BaseException as exc:  # noqa: BLE001
                conn.send(("fatal", None, portable_error(exc)))
            return
        _, seq, origin, batch, lines = message
        try:
            segments, busy = runner.run(origin, batch, lines)
            reply: tuple[Any, ...] = ("done", seq, segments, busy)
        except BaseException as exc:  # noqa: BLE001 - ResourceUnavailable and the like
            reply = ("done", seq, [("raise", portable_error(exc))], 0.0)
        try:
            conn.send(reply)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            # an output value pickle cannot carry (orjson could still have written it)
            conn.send(
                (
                    "done",
                    seq,
                    [
                        (
                            "raise",
                            RemoteError(f"cannot send a result back to the parent process: {exc}"),
                        )
                    ],
                    busy,
                )
            )


# -- the parent side -------------------------------------------------------------------------


class WorkerDied(SageError):
    code = ExitCode.FAILURE


class _Worker:
    def __init__(self, ctx: Any, factory: Any, batch_size: int, index: int) -> None:
        self.index = index
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(
            target=_worker_main,
            name=f"sage-worker-{index}",
            args=(child, factory, batch_size, os.getpid()),
            daemon=True,
        )
        self.process.start()
        child.close()
        self.in_flight = 0
        # A sender thread, so the parent never blocks writing a large batch to a worker that
        # is itself blocked writing its answer back.
        self.outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.sender = threading.Thread(target=self._send_loop, daemon=True)
        self.sender.start()

    def _send_loop(self) -> None:
        while True:
            data = self.outbox.get()
            if data is None:
                return
            try:
                self.conn.send_bytes(data)
            except (OSError, ValueError):
                return  # the worker died; the parent sees it when it reads

    def send(self, message: tuple[Any, ...]) -> None:
        self.outbox.put(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    def describe_death(self) -> str:
        self.process.join(timeout=2)
        code = self.process.exitcode
        if code is None:
            how = "stopped answering"
        elif code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with status {code}"
        return (
            f"worker process {self.index + 1} {how} while processing a batch "
            f"(a crash in the operator or in --fn code; run without --workers to see it)"
        )

    def stop(self) -> None:
        self.outbox.put(None)
        if self.process.is_alive():
            self.process.terminate()
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)
        self.conn.close()


class WorkerPool:
    """N worker processes, each holding one built and set-up copy of the operator."""

    def __init__(self, factory: Any, workers: int, batch_size: int) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        # Started with SIGINT ignored, so a Ctrl-C during their start-up cannot print a
        # traceback; the parent forwards nothing, it stops them itself.
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main else None
        # spawn starts `python -c ...`, which puts the current directory first on sys.path: a
        # `multiprocessing.py` lying in the data directory would run. PYTHONSAFEPATH (3.11)
        # keeps it off; a --fn module is still found (load_function adds the directory itself).
        safe_path = os.environ.get("PYTHONSAFEPATH")
        os.environ["PYTHONSAFEPATH"] = "1"
        try:
            self.workers = [_Worker(ctx, factory, batch_size, i) for i in range(workers)]
        finally:
            if safe_path is None:
                os.environ.pop("PYTHONSAFEPATH", None)
            else:
                os.environ["PYTHONSAFEPATH"] = safe_path
            if in_main:
                signal.signal(signal.SIGINT, previous)
        self._by_conn = {w.conn: w for w in self.workers}
        self.closed = False

    def submit(self, seq: int, origin: str, batch: list[Record], lines: Sequence[int]) -> None:
        worker = min(self.workers, key=lambda w: w.in_flight)
        worker.in_flight += 1
        worker.send(("batch", seq, origin, batch, lines))

    def in_flight(self) -> int:
        return sum(w.in_flight for w in self.workers)

    def poll(self, timeout: float | None) -> list[tuple[Any, ...]]:
        """Answers that arrived within `timeout` seconds (None: wait for at least one)."""
        from multiprocessing.connection import wait

        ready = wait(list(self._by_conn), timeout)
        answers: list[tuple[Any, ...]] = []
        for conn in ready:
            worker = self._by_conn[conn]  # type: ignore[index]
            conn = worker.conn
            try:
                answer = conn.recv()
            except (EOFError, OSError):
                raise WorkerDied(worker.describe_death()) from None
            if answer[0] == "fatal":
                error: BaseException = answer[2]
                raise error
            if answer[0] == "done":
                worker.in_flight -= 1
            elif answer[0] == "closed":
                del self._by_conn[conn]  # it exits now: its end of the pipe closes
            answers.append(answer)
        return answers

    def close(self) -> list[Record]:
        """Ask every worker to close its operator; return what they emitted on close."""
        out: list[Record] = []
        for worker in self.workers:
            worker.send(("close",))
        remaining = len(self.workers)
        while remaining:
            for answer in self.poll(None):
                if answer[0] == "closed":
                    out.extend(answer[2] or [])
                    remaining -= 1
        self.shutdown()
        return out

    def shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        for worker in self.workers:
            worker.stop()


class _PoolSide(Operator):
    """Stands in for the operator in the parent: setting it up starts the workers (the parent
    never loads the model)."""

    def __init__(self, op: Operator, start: Callable[[], None]) -> None:
        self.name = op.name  # type: ignore[misc]
        self.memory = op.memory  # type: ignore[misc]
        self.stateless = op.stateless  # type: ignore[misc]
        self.default_batch_size = op.default_batch_size
        self._start = start

    def setup(self) -> None:
        self._start()

    def process(self, batch: list[Record]) -> list[Record]:  # pragma: no cover - never called
        raise AssertionError("batches go to the workers")


class _DrainFirst:
    """The parent's policy, except that a bad line first waits for every batch before it, so
    that what was written and what `--on-error fail` reports match the one-process run."""

    def __init__(self, policy: ErrorPolicy, drain: Callable[[], None]) -> None:
        self._policy = policy
        self._drain = drain

    def bad_line(self, bad: Any) -> list[Record]:
        self._drain()
        return self._policy.bad_line(bad)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._policy, name)


class _Slot:
    __slots__ = ("segments", "batch", "records_in")

    def __init__(
        self,
        segments: list[Segment] | None = None,
        batch: list[Record] | None = None,
        records_in: int = 0,
    ) -> None:
        self.segments = segments
        self.batch = batch  # kept for the trace until the answer comes
        self.records_in = records_in


class ParallelDriver(Driver):
    """The shared Driver, with each batch processed by a pool of worker processes.

    Reading, batching, bad lines and `_error` pass-through stay here; batches go to the
    workers; their answers are written in input order (or as they come with `ordered=False`).
    """

    def __init__(
        self,
        op: Operator,
        writer: RecordWriter,
        policy: ErrorPolicy,
        batch_size: int,
        on_batch: Callable[[Stats], None] | None,
        factory: Any,
        workers: int,
        *,
        ordered: bool = True,
        max_pending: int | None = None,
    ) -> None:
        super().__init__(_PoolSide(op, self._start), writer, policy, batch_size, on_batch)
        self.policy = _DrainFirst(policy, self.drain)  # type: ignore[assignment]
        self._real_policy = policy
        self.factory = factory
        self.workers = workers
        self.ordered = ordered
        self.max_pending = max_pending or workers * PER_WORKER + 1
        self.pool: WorkerPool | None = None
        self._seq = itertools.count()
        self._in_flight: dict[int, _Slot] = {}
        self._slots: deque[_Slot] = deque()  # ordered mode: every batch not yet written

    def _start(self) -> None:
        if self.pool is None:
            self.pool = WorkerPool(self.factory, self.workers, self.batch_size)

    # -- what the base driver calls ----------------------------------------------------------

    def _run_batch(self, origin: str, batch: list[Record], lines: Sequence[int]) -> None:
        assert self.pool is not None
        self.stats.records_in += len(batch)
        self.stats.batches += 1
        seq = next(self._seq)
        # the trace hook `sage run` installs (None when not traced)
        slot = _Slot(
            batch=batch if getattr(self, "tracer", None) is not None else None,
            records_in=len(batch),
        )
        self._in_flight[seq] = slot
        if self.ordered:
            self._slots.append(slot)
        self.pool.submit(seq, origin, batch, lines if isinstance(lines, range) else list(lines))
        self._collect(0)
        while self._pending() >= self.max_pending:
            self._collect(None)

    def _write(self, records: list[Record]) -> None:
        if records and self._slots:  # behind batches not written yet: keep its place
            self._slots.append(_Slot([("out", records)]))
            return
        super()._write(records)

    def idle(self) -> None:
        """Input is idle: wait for the batches in flight and write them before blocking."""
        self.drain()
        self.writer.flush()

    def finish(self) -> None:
        self.drain()
        if self.pool is not None:
            self._write(self.pool.close())
        self.writer.flush()

    # -- the pool ----------------------------------------------------------------------------

    def _pending(self) -> int:
        return len(self._slots) if self.ordered else len(self._in_flight)

    def drain(self) -> None:
        """Wait for every batch in flight and write everything held back."""
        while self._in_flight:
            self._collect(None)
        self._emit_ready()

    def _collect(self, timeout: float | None) -> None:
        assert self.pool is not None
        if not self._in_flight:
            return
        for answer in self.pool.poll(timeout):
            if answer[0] != "done":
                continue
            _, seq, segments, busy = answer
            self.stats.busy_seconds += busy
            slot = self._in_flight.pop(seq)
            if self.envelope is not None:
                for seg in segments:
                    if seg[0] == "out":
                        self.envelope.stamp(seg[1], busy, slot.records_in)
            tracer = getattr(self, "tracer", None)
            if tracer is not None and slot.batch is not None:
                t1 = time.perf_counter()
                out = [r for seg in segments if seg[0] == "out" for r in seg[1]]
                tracer.batch(slot.batch, out, t1 - busy, t1)
                slot.batch = None
            if self.ordered:
                slot.segments = segments
            else:
                replay(segments, super()._write, self._real_policy)
            if self.on_batch is not None:
                self.on_batch(self.stats)
        self._emit_ready()

    def _emit_ready(self) -> None:
        slots = self._slots
        while slots and slots[0].segments is not None:
            segments = slots.popleft().segments
            assert segments is not None
            replay(segments, super()._write, self._real_policy)

    def shutdown(self) -> None:
        """Stop the workers (also after an error or a signal)."""
        if self.pool is not None:
            self.pool.shutdown()


# -- building the factory a command hands to the workers ------------------------------------


def default_threads() -> int:
    try:
        from sage_cli.resources import default_threads as resolve  # type: ignore[import-not-found]
    except ImportError:  # pragma: no cover - before the models work lands
        return os.cpu_count() or 1
    return int(resolve())


def worker_kwargs(kwargs: dict[str, Any], workers: int) -> dict[str, Any]:
    """The build kwargs for one of `workers` workers: a `threads` budget is divided among
    them (each gets max(1, threads // workers)), everything else is the same."""
    if "threads" not in kwargs or workers <= 1:
        return dict(kwargs)
    total = kwargs["threads"] or default_threads()
    return dict(kwargs, threads=max(1, int(total) // workers))


def parallel_driver(
    op: Operator,
    writer: RecordWriter,
    policy: ErrorPolicy,
    batch_size: int,
    on_batch: Callable[[Stats], None] | None,
    factory: Any,
    workers: int,
    ordered: bool,
) -> ParallelDriver:
    return ParallelDriver(
        op, writer, policy, batch_size, on_batch, factory, workers, ordered=ordered
    )
