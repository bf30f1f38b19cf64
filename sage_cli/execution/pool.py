"""`--workers N`: a stateless operator in N worker processes, behind the executor interface
(sage_cli.execution.executor; DESIGN §4, issue 5).

Each worker rebuilds the operator from its OperatorFactory (the verb's build function and its
parsed flags) in a StageRuntime, calls `setup()` once (a model loads once per worker), then
answers batches with their segments. Everything else (the error policy, order, counters,
traces, the envelope) is the Driver's, in the parent. Batches go to the least busy worker; at
most `capacity` are submitted and not written yet (backpressure).
"""

from __future__ import annotations

import os
import pickle
import queue
import signal
import threading
import time
from typing import Any

from sage_cli.errors import SageError
from sage_cli.execution.executor import Done, Executor, Task
from sage_cli.execution.runtime import RemoteError, StageRuntime, portable_error
from sage_cli.exitcodes import ExitCode
from sage_cli.operators.base import Record

#: batches sent to one worker before it must answer; 2 keeps a worker busy while the parent
#: reads its last answer
PER_WORKER = 2


# -- the worker side -------------------------------------------------------------------------


def _watch_parent(parent: int) -> None:
    """End this worker when the process that started it is gone (killed with SIGKILL)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def _die_with_parent(parent: int) -> bool:
    """Have the kernel kill this worker when the thread that started it ends, the parent's
    main thread (PR_SET_PDEATHSIG): at once, even deep in a long call, and with no thread
    in the worker to watch for it. False where prctl is not there."""
    from sage_cli.run.fork import PR_SET_PDEATHSIG, libc_prctl

    prctl = libc_prctl()
    if prctl is None or prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False  # pragma: no cover - not Linux
    if os.getppid() != parent:  # it was gone before the signal was set
        os._exit(1)
    return True


def _worker_main(
    conn: Any, factory: Any, stop_at_error: bool, parent: int, main_thread: bool
) -> None:
    """A worker process: build and set up the operator once, then answer batches. A parent
    killed with SIGKILL breaks the pipe: the worker then ends quietly (issue 17), never with a
    BrokenPipeError traceback on the stderr it shares with the pipeline. `main_thread`: the
    parent's main thread started it, so the death signal follows the parent process (a
    worker started from another thread would die with that thread: it watches instead)."""
    try:
        _serve(conn, factory, stop_at_error, parent, main_thread)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        os._exit(1)  # the parent's end of the pipe is closed: nobody is left to answer


def _serve(conn: Any, factory: Any, stop_at_error: bool, parent: int, main_thread: bool) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C for everyone
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if not (main_thread and _die_with_parent(parent)):
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    try:
        runner = StageRuntime(factory, stop_at_error)
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
        segments, busy, _ = runner.run(origin, batch, lines)
        reply: tuple[Any, ...] = ("done", seq, segments, busy)
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
    def __init__(
        self, ctx: Any, factory: Any, stop_at_error: bool, index: int, main_thread: bool
    ) -> None:
        self.index = index
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(
            target=_worker_main,
            name=f"sage-worker-{index}",
            args=(child, factory, stop_at_error, os.getpid(), main_thread),
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

    def __init__(self, factory: Any, workers: int, stop_at_error: bool) -> None:
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
            self.workers = [
                _Worker(ctx, factory, stop_at_error, i, in_main) for i in range(workers)
            ]
        finally:
            if safe_path is None:
                os.environ.pop("PYTHONSAFEPATH", None)
            else:
                os.environ["PYTHONSAFEPATH"] = safe_path
            if in_main:
                signal.signal(signal.SIGINT, previous)
        self._by_conn = {w.conn: w for w in self.workers}
        self.closed = False

    def submit(self, task: Task) -> None:
        worker = min(self.workers, key=lambda w: w.in_flight)
        worker.in_flight += 1
        lines = task.lines if isinstance(task.lines, range) else list(task.lines)
        worker.send(("batch", task.seq, task.origin, task.batch, lines))

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


class ProcessPoolExecutor(Executor):
    """`--workers N`: batches run in N worker processes, each with its own operator."""

    kind = "workers"

    def __init__(self, factory: Any, workers: int, stop_at_error: bool = False) -> None:
        self.factory = factory
        self.workers = workers
        self.stop_at_error = stop_at_error
        self.capacity = workers * PER_WORKER + 1
        self.pool: WorkerPool | None = None

    def start(self) -> None:
        if self.pool is None:
            self.pool = WorkerPool(self.factory, self.workers, self.stop_at_error)

    def submit(self, task: Task) -> None:
        assert self.pool is not None
        self.pool.submit(task)

    def results(self, wait: bool) -> list[Done]:
        assert self.pool is not None
        if not self.pool.in_flight():
            return []
        return [
            Done(a[1], a[2], a[3]) for a in self.pool.poll(None if wait else 0) if a[0] == "done"
        ]

    def close(self) -> list[Record]:
        return self.pool.close() if self.pool is not None else []

    def shutdown(self) -> None:
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
