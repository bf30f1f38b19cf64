"""One stage of a supervised pipeline across its attempts (StageRun)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from sage_cli.run.flight import Flight
from sage_cli.run.script import Stage


@dataclass
class StageRun:
    """One stage of the pipeline across its attempts (restarts)."""

    stage: Stage
    argv: list[str]
    env: dict[str, str]
    cond: threading.Condition = field(default_factory=threading.Condition)
    generation: int = 0
    final: bool = False
    status: int | None = None
    attempts: int = 0
    pid: int | None = None
    started: float = 0.0
    stdin_w: int | None = None  # the relay writes the stage's input here
    stdout_r: int | None = None  # the relay reads the stage's output here
    flight: Flight | None = None
    out_skip: int = 0  # a restarted first stage repeats this many records: drop them
    drained_gen: int = -1  # the last attempt whose output the relay has read to the end
    cpu: float = 0.0
    rss_mb: float = 0.0
    last_crash: int = 0
    isolated: bool = False  # this attempt runs batches of one (see Flight.note_crash)

    @property
    def name(self) -> str:
        return self.stage.name

    def wait_after(self, generation: int) -> str:
        """Block until the attempt `generation` is over: 'restarted' or 'final'."""
        with self.cond:
            while self.generation == generation and not self.final:
                self.cond.wait()
            return "restarted" if self.generation != generation else "final"
