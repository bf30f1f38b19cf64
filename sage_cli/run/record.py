"""One run's record in its run directory: run.json (what ran), events.ndjson (the supervisor's
event stream) and summary.json (what came of it, with the one line on stderr at the end). Every
kind of run writes them through `Run`: a script taken apart, a script bash runs, a Ray run."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from sage_cli.run.directory import RunDirectory, summarise


class Events:
    """A run's event stream (events.ndjson), flushed on every event."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.lock = threading.Lock()

    def emit(self, kind: str, **fields: Any) -> None:
        data = orjson.dumps(
            {"ev": kind, "t": time.time(), **fields}, option=orjson.OPT_APPEND_NEWLINE, default=str
        )
        with self.lock:
            try:
                os.write(self.fd, data)
            except OSError:
                pass

    def close(self) -> None:
        os.close(self.fd)


class Run:
    """A run being recorded: `info` goes to run.json now (and again on `update`), `events` is
    its stream, `finish` writes summary.json and says how it ended."""

    def __init__(self, directory: RunDirectory, **info: Any) -> None:
        self.directory = directory
        self.info: dict[str, Any] = {"run_id": directory.id, **info}
        self.started = time.monotonic()
        self.directory.write_json("run.json", self.info)
        self.events = Events(directory.events_path)

    def update(self, **info: Any) -> None:
        self.info.update(info)
        self.directory.write_json("run.json", self.info)

    def emit(self, kind: str, **fields: Any) -> None:
        self.events.emit(kind, **fields)

    def finish(self, status: int, quiet: bool = False) -> dict[str, Any]:
        """summary.json (the run's status is `status`) and, unless `quiet`, the line on stderr."""
        self.events.close()
        summary = summarise(self.directory)
        summary["status"] = status
        self.directory.write_json("summary.json", summary)
        if not quiet:
            report_end(self.directory, summary, status, time.monotonic() - self.started)
        return summary


def report_end(run: RunDirectory, summary: dict[str, Any], status: int, seconds: float) -> None:
    """One line on stderr: how the run ended, which stage failed, where the trace is."""
    failed = [s for s in summary["stages"] if s.get("status")]
    restarts = sum(s.get("restarts", 0) for s in summary["stages"])
    parts = [f"sage run: {len(summary['stages'])} stage(s), {seconds:.1f}s, exit {status}"]
    if restarts:
        parts.append(f"{restarts} restart(s)")
    if failed and status:
        last = failed[-1]
        parts.append(f"stage {last['index'] + 1} ({last['command']}) exited {last['status']}")
    parts.append(f"trace: {run.path} (sage trace {run.id})")
    try:
        sys.stderr.write("; ".join(parts) + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
