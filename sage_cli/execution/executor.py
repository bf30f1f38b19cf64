"""Where a batch runs: the one small interface behind the Driver, and the inline executor.

An executor takes batches (`submit`), gives back finished ones (`results`, in any order: the
Driver puts them back in input order), and holds the operator copies: `start` builds and sets
them up, `tick` asks a time-driven operator what it has ready, `close` collects what they still
hold, `shutdown` stops them (also after an error or a signal). Three implementations:

- `InlineExecutor` (here): the operator in this process, one batch at a time;
- `ProcessPoolExecutor` (sage_cli.execution.pool): `--workers N` processes;
- `RayExecutor` (sage_cli.execution.ray): a pool of Ray actors (`sage run --engine ray`).

An executor never writes, counts, traces or judges: the Driver does all of that, once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from sage_cli.execution.runtime import Segment, run_batch
from sage_cli.operators.base import Operator, Record


@dataclass(slots=True)
class Task:
    """One batch to run: its number in input order, where it came from and its line numbers."""

    seq: int
    origin: str
    batch: list[Record]
    lines: Sequence[int]


@dataclass(slots=True)
class Done:
    """A finished batch: its segments (sage_cli.execution.runtime), the seconds the operator
    spent on it, and whether the operator wants no more input (`head`)."""

    seq: int
    segments: list[Segment]
    busy: float
    done: bool = False


class Executor:
    """The interface (and the defaults) every executor implements."""

    #: batches submitted and not yet taken back before the Driver waits for one
    capacity: int = 1
    #: short name for messages and traces: inline, workers, ray
    kind: str = "executor"

    def start(self) -> None:
        """Build and set up the operator copies (a model loads here, once per copy)."""

    def submit(self, task: Task) -> None:
        raise NotImplementedError

    def run_now(self, task: Task) -> Done | None:
        """Run `task` here and now if this executor can (inline); None: `submit` it."""
        return None

    def results(self, wait: bool) -> list[Done]:
        """Finished batches; with `wait`, block until at least one is (if any is in flight)."""
        raise NotImplementedError

    def tick(self, now: float) -> list[Record]:
        """What a time-driven operator (a window) has ready at `now`."""
        return []

    def close(self) -> list[Record]:
        """Close every copy of the operator; return what they still held."""
        return []

    def abandon(self) -> None:
        """The run ends early: drop partial output (a sink's temporary file)."""

    def shutdown(self) -> None:
        """Stop the copies (processes, actors); called once, however the run ended."""


class InlineExecutor(Executor):
    """The operator in this process: `submit` runs the batch at once."""

    kind = "inline"

    def __init__(self, op: Operator, stop_at_error: bool = False) -> None:
        self.op = op
        self.stop_at_error = stop_at_error
        self._done: list[Done] = []
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            self.op.setup()

    def run_now(self, task: Task) -> Done:
        t0 = time.perf_counter()
        segments = run_batch(self.op, task.origin, task.batch, task.lines, self.stop_at_error)
        return Done(task.seq, segments, time.perf_counter() - t0, self.op.done)

    def submit(self, task: Task) -> None:
        self._done.append(self.run_now(task))

    def results(self, wait: bool) -> list[Done]:
        done, self._done = self._done, []
        return done

    def tick(self, now: float) -> list[Record]:
        return self.op.tick(now)

    def close(self) -> list[Record]:
        return self.op.close()

    def abandon(self) -> None:
        self.op.abandon()
