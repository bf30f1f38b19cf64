"""Progress on stderr for long work: a status line redrawn in place on a terminal, plain
periodic lines otherwise (with --progress). Never on stdout.

The line shows records in/out/errors and records/s; for a model stage (an operator with
`completed` and `generated_tokens` counters, e.g. generate) also tokens/s, counted as each
record of a batch is answered; and when the input's size is known (files, or stdin redirected
from a file) the share done and an ETA."""

from __future__ import annotations

import os
import stat
import sys
import time
from collections.abc import Iterable
from typing import Any

REDRAW_SECONDS = 0.25
LINE_SECONDS = 5.0
#: work shorter than this shows no progress: a pipe of quick stages stays quiet on a terminal
DELAY_SECONDS = 1.0
#: inputs larger than this are not counted up front (no ETA)
COUNT_LIMIT_BYTES = 256 * 1024 * 1024


class Progress:
    def __init__(self, prog: str, total: int | None = None, op: Any = None) -> None:
        self.prog = prog
        self.tty = sys.stderr.isatty()
        self.every = REDRAW_SECONDS if self.tty else LINE_SECONDS
        self.started = time.monotonic()
        self._last = 0.0
        self._shown = False
        self.color = self.tty and "NO_COLOR" not in os.environ
        #: records in the input, when known
        self.total = total
        #: a model stage's operator: `completed` records and `generated_tokens` so far
        self.op = op if hasattr(op, "generated_tokens") and hasattr(op, "completed") else None
        #: the work after the input being shown (`step`), and when it began
        self._step = ""
        self._step_started = 0.0

    def line(self, stats: Any, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        done = stats.records_in
        text = f"{self.prog}: "
        if self.op is not None:
            done = max(int(self.op.completed) + stats.errors, stats.records_out)
            text += f"{done:,} done"
        else:
            text += f"{stats.records_in:,} in, {stats.records_out:,} out"
        rate = done / elapsed
        text += f", {stats.errors:,} errors, {rate:,.1f} rec/s"
        if self.op is not None:
            text += f", {self.op.generated_tokens / elapsed:,.1f} tok/s"
        elif stats.tokens and stats.busy_seconds > 0:  # the figure `sage trace` shows as tok/s
            text += f", {stats.tokens / stats.busy_seconds:,.1f} tok/s"
        if self.total:
            share = min(done / self.total, 1.0)
            text += f", {share:.0%} of {self.total:,}"
            if rate > 0 and done < self.total:
                text += f", ETA {clock((self.total - done) / rate)}"
        return text + f", {clock(elapsed)}"

    def update(self, stats: Any, force: bool = False) -> None:
        now = time.monotonic()
        if not force and (now - self._last < self.every or now - self.started < DELAY_SECONDS):
            return
        self._show(self.line(stats, now), now)

    def step(self, what: str, done: int, total: int) -> None:
        """Work after the last input record (an index build's sentence vectors): `done` of
        `total`, with its own ETA. Its first line comes at once with --progress, and on a
        terminal once the work has lasted past the quiet start."""
        now = time.monotonic()
        if what != self._step:
            self._step, self._step_started = what, now
            force = not self.tty or now - self.started >= DELAY_SECONDS
        else:
            force = done >= total and self._shown
        if not force and (now - self._last < self.every or now - self.started < DELAY_SECONDS):
            return
        text = f"{self.prog}: {what} {done:,} of {total:,}"
        if 0 < done < total:
            text += f", ETA {clock((total - done) * (now - self._step_started) / done)}"
        self._show(text + f", {clock(now - self.started)}", now)

    def _show(self, text: str, now: float) -> None:
        self._last = now
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


def clock(seconds: float) -> str:
    """`75.2` -> `1:15`, `3725` -> `1:02:05`."""
    s = int(seconds + 0.5)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def count_records(paths: Iterable[str]) -> int | None:
    """Lines in the inputs (`-` is stdin), when every one is a regular file and together they
    are small enough to count; None otherwise (a pipe, a terminal, a huge file)."""
    fds: list[tuple[int, bool]] = []
    try:
        for path in paths:
            if path == "-":
                try:
                    fds.append((sys.stdin.fileno(), False))
                except (AttributeError, OSError, ValueError):
                    return None
            else:
                fds.append((os.open(path, os.O_RDONLY), True))
        sizes = []
        for fd, _ in fds:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            sizes.append(st.st_size)
        if sum(sizes) > COUNT_LIMIT_BYTES:
            return None
        lines = 0
        for fd, _ in fds:
            data = os.pread(fd, os.fstat(fd).st_size, 0)  # the stream's own offset is untouched
            lines += data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
        return lines
    except OSError:
        return None
    finally:
        for fd, own in fds:
            if own:
                os.close(fd)
