"""One stage of a supervised pipeline (StageRun)."""

from __future__ import annotations

from dataclasses import dataclass

from sage_cli.run.script import Stage


@dataclass
class StageRun:
    """One stage of the pipeline: its command, environment and process."""

    stage: Stage
    argv: list[str]
    env: dict[str, str]
    final: bool = False
    status: int | None = None
    attempts: int = 0
    pid: int | None = None
    started: float = 0.0
    stdout_r: int | None = None  # the relay reads the stage's output here
    #: a sage stage: its arguments, to run in a forked copy of the supervisor (run.fork)
    fork_argv: list[str] | None = None
    cpu: float = 0.0
    rss_mb: float = 0.0

    @property
    def name(self) -> str:
        return self.stage.name
