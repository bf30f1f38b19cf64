"""Micro-batching: one thread owns the models, and the requests that wait together go into one
`process(batch)` call.

`ModelWorker(handlers)` takes jobs of named kinds ("chat", "embed", "stream" ...). Its thread
takes the oldest job, then gathers every job of the same kind already waiting or arriving within
`window` seconds (up to the kind's batch limit) and hands them to that kind's handler in one call;
jobs of other kinds keep their place for the next round. A handler returns one result (or
exception) per job, in order. Requests that arrive while the model is busy are all waiting by
the time it is free, so under load batches fill up by themselves; a lone request pays at most
`window` (a few milliseconds).

Model calls never run on the event loop: `submit` returns a `concurrent.futures.Future` that
`asyncio.wrap_future` awaits, and `call` blocks (for the REPL and the MCP server). A job whose
future was cancelled before its turn (its client went away) is dropped.
"""

from __future__ import annotations

import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

#: a handler answers a batch of payloads: one result or exception per payload, in order
Handler = Callable[[list[Any]], Sequence[Any]]


@dataclass
class Job:
    kind: str
    payload: Any
    future: Future[Any] = field(default_factory=Future)


class WorkerStopped(RuntimeError):
    """The worker was stopped before the job ran."""


_STOP = Job("__stop__", None)


class ModelWorker:
    """One thread that runs every model call, batching jobs of the same kind."""

    def __init__(
        self,
        handlers: dict[str, Handler],
        *,
        window: float = 0.002,
        max_batch: dict[str, int] | None = None,
        default_max_batch: int = 32,
        on_batch: Callable[[str, int, float], None] | None = None,
        name: str = "sage-model",
    ) -> None:
        self.handlers = handlers
        self.window = max(window, 0.0)
        self.max_batch = dict(max_batch or {})
        self.default_max_batch = max(1, default_max_batch)
        self.on_batch = on_batch
        self._queue: queue.Queue[Job] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._stopping = False
        #: batches run so far, by kind (for tests and /health)
        self.batches: dict[str, int] = {}
        self.jobs_done = 0
        #: jobs in the batch the thread is running now
        self.running = 0

    def start(self) -> None:
        self._thread.start()

    def submit(self, kind: str, payload: Any) -> Future[Any]:
        if kind not in self.handlers:
            raise KeyError(f"no handler for {kind!r}")
        job = Job(kind, payload)
        if self._stopping:
            job.future.set_exception(WorkerStopped("the server is shutting down"))
            return job.future
        self._queue.put(job)
        return job.future

    def call(self, kind: str, payload: Any, timeout: float | None = None) -> Any:
        """Run one job and wait for its result (raises its exception)."""
        return self.submit(kind, payload).result(timeout)

    def stop(self, timeout: float | None = None) -> None:
        """Finish the jobs already queued, then end the thread."""
        self._stopping = True
        self._queue.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def pending(self) -> int:
        return self._queue.qsize()

    # -- the thread ---------------------------------------------------------------------------

    def _loop(self) -> None:
        # SIGINT/SIGTERM belong to the main thread (its handlers stop a REPL's answer or drain
        # the server); so do the model's own threads, which inherit this mask
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        held: deque[Job] = deque()  # taken from the queue while gathering another kind
        stop = False
        while True:
            if held:
                job = held.popleft()
            elif stop:
                self._refuse_rest()
                break
            else:
                job = self._queue.get()
            if job is _STOP:
                stop = True
                continue
            limit = self.max_batch.get(job.kind, self.default_max_batch)
            batch = [job]
            for other in list(held):
                if len(batch) >= limit:
                    break
                if other.kind == job.kind:
                    held.remove(other)
                    batch.append(other)
            deadline = time.monotonic() + self.window
            while len(batch) < limit:
                wait = deadline - time.monotonic()
                try:
                    nxt = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    continue
                if nxt.kind == job.kind:
                    batch.append(nxt)
                else:
                    held.append(nxt)
            self._run(job.kind, batch)

    def _refuse_rest(self) -> None:
        """Jobs that slipped in after the stop: they will not run."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not _STOP and job.future.set_running_or_notify_cancel():
                job.future.set_exception(WorkerStopped("the server is shutting down"))

    def _run(self, kind: str, batch: list[Job]) -> None:
        live = [j for j in batch if j.future.set_running_or_notify_cancel()]
        if not live:
            return
        t0 = time.perf_counter()
        self.running = len(live)
        try:
            results = list(self.handlers[kind]([j.payload for j in live]))
            if len(results) != len(live):
                raise RuntimeError(
                    f"handler {kind!r} returned {len(results)} results for {len(live)} jobs"
                )
        except BaseException as exc:  # noqa: BLE001 - the whole batch failed: each job says so
            results = [exc] * len(live)
        seconds = time.perf_counter() - t0
        self.running = 0
        self.batches[kind] = self.batches.get(kind, 0) + 1
        self.jobs_done += len(live)
        if self.on_batch is not None:
            try:
                self.on_batch(kind, len(live), seconds)
            except Exception:  # noqa: BLE001 - metrics must not lose answers
                pass
        for j, result in zip(live, results, strict=True):
            if isinstance(result, BaseException):
                j.future.set_exception(result)
            else:
                j.future.set_result(result)
