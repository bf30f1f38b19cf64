"""Relays: the supervisor's copy of one stage's output to the next stage's input (or to the
run's output) when the pipe cannot be direct (`--retries`, `--resume`, the run's output),
keeping the books restart and resume need. A relay gets what it needs from whoever runs it as
callbacks (RelayHooks), not the supervisor itself."""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sage_cli.run.flight import Replay, write_all
from sage_cli.run.ids import record_id
from sage_cli.run.stage import StageRun

READ_SIZE = 64 * 1024

try:  # glibc: give freed heap pages back (see Relay, TRIM_BYTES)
    _malloc_trim: Any = ctypes.CDLL(None).malloc_trim
except (OSError, AttributeError):  # pragma: no cover - not glibc
    _malloc_trim = None
#: a relay returns the heap's free pages to the system after this many bytes: glibc keeps what
#: the relays' threads free (64 KB buffers, one after another) in per-thread arenas it rarely
#: shrinks, and a `--retries` run grew by ~50 MB per 2M records without it
TRIM_BYTES = 16 * 1024 * 1024


@dataclass
class RelayHooks:
    """What a relay needs from whoever runs it: a warning line, the records to feed a restarted
    stage again, an event for the run's stream, and whether restarts are on (line mode)."""

    warn: Callable[[str], None]
    replay_for: Callable[[StageRun], Replay]
    emit: Callable[..., None]
    retries: bool = False


class Relay(threading.Thread):
    """Copies one stage's output to the next stage's input (or to the run's output),
    keeping the books restart and resume need."""

    def __init__(
        self,
        hooks: RelayHooks,
        up: StageRun,
        down: StageRun | None,
        target_fd: int | None = None,
        ledger_fd: int | None = None,
        skip_keys: set[Any] | None = None,
        skip_ids: set[Any] | None = None,
    ) -> None:
        super().__init__(name=f"relay-{up.name}", daemon=True)
        self.hooks = hooks
        self.up = up
        self.down = down
        self.target_fd = target_fd
        self.ledger_fd = ledger_fd
        self.skip_keys = skip_keys  # --resume: input records whose results are all out
        self.skip_ids = skip_ids  # --resume: results already in the run's output
        self.records = 0
        self.taken = 0  # lines taken from the stage upstream (before --resume filters)
        self.gone = False  # the reader downstream is gone for good
        self.gen_down = down.generation if down else 0
        self.wfd = down.stdin_w if down is not None else target_fd
        self.line_mode = bool(
            up.flight is not None
            or (down and down.flight is not None)
            or skip_keys is not None
            or skip_ids is not None
            or hooks.retries
        )

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # noqa: BLE001 - a relay must never die silently
            self.hooks.warn(f"relay after {self.up.name} failed: {type(exc).__name__}: {exc}")
            self.gone = True
        finally:
            self._close_down()

    def _run(self) -> None:
        up = self.up
        gen_up = up.generation
        rfd = up.stdout_r
        partial = b""
        assert rfd is not None
        since_trim = 0
        while True:
            try:
                chunk = os.read(rfd, READ_SIZE)
            except OSError:
                chunk = b""
            if chunk:
                since_trim += len(chunk)
                if since_trim >= TRIM_BYTES and _malloc_trim is not None:
                    since_trim = 0
                    _malloc_trim(0)
                if not self.line_mode:
                    self.records += chunk.count(b"\n")
                    self._deliver(chunk, None)
                else:
                    data = partial + chunk if partial else chunk
                    nl = data.rfind(b"\n")
                    if nl < 0:
                        partial = data
                        continue
                    partial = data[nl + 1 :]
                    self._lines(None, data[:nl])
                if self.gone:
                    os.close(rfd)  # the stage upstream gets EPIPE and ends
                    return
                continue
            os.close(rfd)
            with up.cond:
                up.drained_gen = gen_up
                up.cond.notify_all()
            outcome = up.wait_after(gen_up)
            if outcome == "restarted":
                if up.flight is None:  # a first stage starts over: drop what it repeats
                    up.out_skip = self.taken
                gen_up = up.generation
                rfd = up.stdout_r
                partial = b""  # a torn last line of the dead process: its input is replayed
                assert rfd is not None
                continue
            if partial and up.status == 0:
                self._lines([partial]) if self.line_mode else self._deliver(partial + b"\n", None)
            return

    def _lines(self, lines: list[bytes] | None, block: bytes | None = None) -> None:
        """Handle complete lines: `block` (lines joined by `\\n`) or the list `lines`."""
        up = self.up
        if (
            block is None
            or not block
            or b"\n\n" in block
            or block[:1] == b"\n"
            or (block[-1:] == b"\n")
        ):
            if lines is None:
                assert block is not None
                lines = block.split(b"\n")
            block = b"\n".join(ln for ln in lines if ln)
            if not block:
                return
        if up.flight is not None:
            block = up.flight.finished(block)
            if not block:
                return
        elif up.out_skip:
            parts = block.split(b"\n")
            drop = min(up.out_skip, len(parts))
            up.out_skip -= drop
            block = b"\n".join(parts[drop:])
            if not block:
                return
        n = block.count(b"\n") + 1
        self.taken += n
        if self.skip_keys or self.skip_ids is not None:
            block = self._resume_filter(block)
            if not block:
                return
            n = block.count(b"\n") + 1
        self.records += n
        down = self.down
        if down is not None and down.flight is not None:
            down.flight.sent(block)
        self._deliver(block + b"\n", None)

    def _resume_filter(self, block: bytes) -> bytes:
        """--resume: drop input records whose results are all out, and results already out."""
        lines = block.split(b"\n")
        if self.skip_keys:
            done = self.skip_keys
            lines = [ln for ln in lines if record_id(ln) not in done]
        if self.skip_ids is not None:
            seen = self.skip_ids
            kept = []
            for ln in lines:
                rid = record_id(ln)
                if rid not in seen:
                    kept.append(ln)
                    if rid is not None:
                        seen.add(rid)
            lines = kept
        return b"\n".join(lines)

    def _deliver(self, data: bytes, keys: list[Any] | None) -> None:
        if self.ledger_fd is not None:
            write_all(self.ledger_fd, data)
        down = self.down
        while not self.gone:
            if down is not None and down.generation != self.gen_down:
                self._switch_down()
                if down.flight is not None:
                    return  # the replay carried `data` (it was in flight)
            try:
                assert self.wfd is not None
                write_all(self.wfd, data)
                return
            except OSError:
                if down is None:
                    self.gone = True  # our stdout was closed (`| head`): end quietly
                    return
                if down.wait_after(self.gen_down) == "final":
                    self.gone = True
                    return

    def _switch_down(self) -> None:
        """The stage downstream was restarted: feed the new process what the old one held."""
        down = self.down
        assert down is not None
        if self.wfd is not None:
            try:
                os.close(self.wfd)
            except OSError:
                pass
        with down.cond:
            self.gen_down = down.generation
            self.wfd = down.stdin_w
        if down.flight is None:
            return
        replay = self.hooks.replay_for(down)
        try:
            for chunk in replay.chunks():  # a block at a time: it may come from spill files
                assert self.wfd is not None
                write_all(self.wfd, chunk)
        except OSError:
            pass  # it died again: the next write or close notices
        finally:
            replay.close()
        self.hooks.emit("replay", stage=down.name, records=replay.records)

    def _close_down(self) -> None:
        down = self.down
        if down is None:
            return  # the run's stdout is closed by the supervisor
        while True:
            if self.wfd is not None:
                try:
                    os.close(self.wfd)
                except OSError:
                    pass
                self.wfd = None
            if self.gone:
                return
            if down.wait_after(self.gen_down) != "restarted":
                return
            self._switch_down()
