"""What a run was asked for, and the limits both ways of running share (a parsed pipeline's
Supervisor, a bash script's session): its own module, so a run bash runs does not load the
supervisor to read them."""

from __future__ import annotations

from dataclasses import dataclass

TIMEOUT_STATUS = 124  # like timeout(1)
KILL_GRACE_SECONDS = 5.0


@dataclass
class RunOptions:
    retries: int = 0
    backoff: float = 0.5
    timeout: float | None = None
    quiet: bool = False
    progress: bool = False
    resume: bool = False
    trace: str = "full"  # full: a span per record; batches: no ids; off: no stage traces
