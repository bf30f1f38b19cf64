"""Progress on stderr for long work: a status line redrawn in place on a terminal, plain
periodic lines otherwise (with --progress). Never on stdout."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

REDRAW_SECONDS = 0.25
LINE_SECONDS = 5.0
#: work shorter than this shows no progress: a pipe of quick stages stays quiet on a terminal
DELAY_SECONDS = 1.0


class Progress:
    def __init__(self, prog: str) -> None:
        self.prog = prog
        self.tty = sys.stderr.isatty()
        self.every = REDRAW_SECONDS if self.tty else LINE_SECONDS
        self.started = time.monotonic()
        self._last = 0.0
        self._shown = False
        self.color = self.tty and "NO_COLOR" not in os.environ

    def update(self, stats: Any, force: bool = False) -> None:
        now = time.monotonic()
        if not force and (now - self._last < self.every or now - self.started < DELAY_SECONDS):
            return
        self._last = now
        elapsed = max(now - self.started, 1e-9)
        rate = stats.records_in / elapsed
        text = (
            f"{self.prog}: {stats.records_in:,} in, {stats.records_out:,} out, "
            f"{stats.errors:,} errors, {rate:,.1f} rec/s, {elapsed:,.1f}s"
        )
        if stats.tokens and stats.busy_seconds > 0:  # the figure `sage trace` shows as tok/s
            text += f", {stats.tokens / stats.busy_seconds:,.1f} tok/s"
        if self.tty:
            if self.color:
                text = f"\x1b[2m{text}\x1b[0m"
            sys.stderr.write("\r\x1b[K" + text)
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()
        self._shown = True

    def close(self) -> None:
        if self._shown and self.tty:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
