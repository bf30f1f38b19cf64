"""The supervisor behind `sage run` (DESIGN §5).

It starts every stage of a parsed pipeline itself (`sage` stages as `python -m sage_cli` in this
interpreter, others as they are), each in its own process group and killed with the supervisor
(PR_SET_PDEATHSIG), connects them with pipes, forwards SIGINT/SIGTERM to every group, reaps every
process, records each stage's exit status, CPU time and peak memory, and exits as bash's
`set -o pipefail` would: the status of the last (rightmost) stage that failed, 0 if none did.

Between two stages the pipe is either direct (the default: no cost) or relayed through the
supervisor (`--retries`, `--resume`, and the run's output when it goes to stdout). A relay knows
which records each stage has taken in and not finished, by `id` and lineage (`parent_id`,
`query_id`), so a stage that crashes can be restarted and fed them again, and it drops the
results the new process repeats. That holds for operators whose output keeps input order
(every streaming sage operator).
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson

from sage_cli.exitcodes import ExitCode
from sage_cli.observability.redact import redact_argv
from sage_cli.run.directory import RunDirectory
from sage_cli.run.env import THREADS, StageEnv
from sage_cli.run.script import Pipeline, Stage

READ_SIZE = 64 * 1024
TIMEOUT_STATUS = 124  # like timeout(1)
KILL_GRACE_SECONDS = 5.0
#: exit statuses a restart cannot fix
NO_RETRY = {
    int(ExitCode.USAGE),
    int(ExitCode.UNAVAILABLE),
    int(ExitCode.INTERRUPTED),
    int(ExitCode.TERMINATED),
}
#: --retries: bytes of a stage's in-flight records a relay keeps in memory before it spills
#: them to files in the run directory (SAGE_RUN_FLIGHT_MB overrides), and the size of one file
FLIGHT_MEMORY = 8 * 1024 * 1024
SPILL_SEGMENT = 64 * 1024 * 1024
#: after this many crashes with the same record at the head, a stage is restarted in isolation
#: (batches of one, flushed at once); a crash in isolation sends the head record to the dead letter
ISOLATE_AFTER = 2

_PR_SET_PDEATHSIG = 1
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _prctl: Any = _libc.prctl
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _prctl = None

try:  # glibc: give freed heap pages back (see Relay, TRIM_BYTES)
    _malloc_trim: Any = ctypes.CDLL(None).malloc_trim
except (OSError, AttributeError):  # pragma: no cover - not glibc
    _malloc_trim = None
#: a relay returns the heap's free pages to the system after this many bytes: glibc keeps what
#: the relays' threads free (64 KB buffers, one after another) in per-thread arenas it rarely
#: shrinks, and a `--retries` run grew by ~50 MB per 2M records without it
TRIM_BYTES = 16 * 1024 * 1024


#: util-linux setpriv sets the parent-death signal and execs the stage (no Python in the child)
_SETPRIV = shutil.which("setpriv") if sys.platform.startswith("linux") else None


def _child_setup() -> None:
    """In the child, before exec: die with the supervisor (even on its kill -9)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def exit_status(wait_status: int) -> int:
    """A wait status as bash reports it: the exit code, or 128 + the signal number."""
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


def pipefail(statuses: list[int | None]) -> int:
    """bash's `set -o pipefail`: the last non-zero status, or 0."""
    result = 0
    for s in statuses:
        if s:
            result = s
    return result


# -- ids in the stream ----------------------------------------------------------------------------

_FAST_ID = re.compile(rb'\{"id":(?:"([^"\\]*)"|(-?[0-9]{1,18})[,}])')


def record_id(line: bytes) -> Any:
    """The `id` of an NDJSON line (fast for lines that start with a plain string id)."""
    m = _FAST_ID.match(line)
    if m is not None:
        text = m.group(1)
        return text.decode("utf-8", "surrogateescape") if text is not None else int(m.group(2))
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return _hashable(value.get("id")) if type(value) is dict else None


def lineage_key(line: bytes) -> Any:
    """The key of the input record an output line came from: parent_id, query_id or id."""
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if type(value) is not dict:
        return None
    for k in ("parent_id", "query_id", "id"):
        if value.get(k) is not None:
            return _hashable(value[k])
    return None


def _hashable(v: Any) -> Any:
    return v if isinstance(v, str | int | float | type(None)) else orjson.dumps(v)


_ID_TOKEN = re.compile(rb'\{"id":("[^"\\]*"|-?[0-9]{1,18})[,}]')


def id_token(line: bytes) -> bytes | None:
    """The `id` of a line as its JSON text (b'"doc1"', b'12'): the key the relays track."""
    m = _ID_TOKEN.match(line)
    if m is not None:
        return m.group(1)
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if type(value) is not dict or value.get("id") is None:
        return None
    return orjson.dumps(value["id"])


def _key_of(line: bytes) -> list[bytes]:
    """The tokens an output line can be matched to its input by: id, parent_id, query_id."""
    m = _ID_TOKEN.match(line)
    first = [m.group(1)] if m is not None else []
    if m is not None and b'"parent_id"' not in line and b'"query_id"' not in line:
        return first
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        return first
    if type(value) is not dict:
        return first
    return [
        orjson.dumps(value[k]) for k in ("id", "parent_id", "query_id") if value.get(k) is not None
    ]


class _Segment:
    """A spill file of in-flight blocks (unlinked at once: only its descriptor keeps it)."""

    __slots__ = ("fd", "size", "live")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = 0
        self.live = 0  # blocks in it not finished yet


class _Spilled:
    """An in-flight block kept in a spill segment rather than in memory."""

    __slots__ = ("segment", "offset", "length")

    def __init__(self, segment: _Segment, offset: int, length: int) -> None:
        self.segment = segment
        self.offset = offset
        self.length = length


class Flight:
    """The records a stage has taken in and not finished, in the order it took them.

    The records are kept as the blocks they were sent in (bytes, one `\n` before every line),
    with the head (the first record not finished) as a block index and a byte offset. A result
    whose lineage key (its id, else its parent_id or query_id) is record K finishes every record
    before K: outputs keep input order. K itself stays in flight (it may still have results to
    come, e.g. chunks); the ids of its results seen so far are kept, to drop them when it is
    replayed. Finding K is a bytes search from the head (in C), so a relay does a few Python
    operations per block, none per record.

    Memory is bounded: past `memory` bytes, blocks go to spill files in `spill_dir` (segments
    of SPILL_SEGMENT bytes, unlinked when made and closed once every block in them is finished).
    A stage that passes nothing on (`sink --to`) or drops long runs of records (`filter`) keeps
    everything it took in in flight, since a restart must feed it all again: that costs disk,
    not memory.
    """

    def __init__(self, spill_dir: Path | None = None, memory: int = FLIGHT_MEMORY) -> None:
        self.lock = threading.Lock()
        self.blocks: list[bytes | _Spilled] = []
        self.slow: list[bool] = []  # blocks with lines whose id is not their first field
        self.counts: list[int] = []  # lines in each block
        self.head_block = 0
        self.head_off = 0  # offset of the `\n` that starts the head line
        self.head_key: bytes | None = None
        self.head_out: set[bytes | None] = set()  # result ids already seen for the head
        self.suppress: set[bytes | None] = set()  # results a restarted process will repeat
        self.dead: set[bytes | None] = set()  # keys of records sent to the dead letter
        self.crashes: Counter[bytes | None] = Counter()  # crashes while a key was the head
        self.poison_pending = False
        self.spill_dir = spill_dir
        self.memory = memory
        self.in_memory = 0  # bytes of the blocks held in memory
        self.spilled = 0  # bytes written to spill segments (ever)
        self._segment: _Segment | None = None  # the segment being written
        self._pins = 0  # replays reading spilled blocks: segments stay open until they end
        self._unpinned: list[_Segment] = []
        self._cache: tuple[_Spilled | None, bytes] = (None, b"")

    def sent(self, block: bytes) -> None:
        """`block`: complete lines joined by `\n`, without the last one's newline."""
        blk = b"\n" + block
        lines = blk.count(b"\n")
        slow = blk.count(b'\n{"id":') != lines
        with self.lock:
            item: bytes | _Spilled = blk
            if self.spill_dir is not None and self.in_memory + len(blk) > self.memory:
                item = self._spill(blk)
            if item is blk:
                self.in_memory += len(blk)
            self.blocks.append(item)
            self.slow.append(slow)
            self.counts.append(lines)

    def _spill(self, blk: bytes) -> bytes | _Spilled:
        seg = self._segment
        try:
            if seg is None or seg.size >= SPILL_SEGMENT:
                assert self.spill_dir is not None
                path = self.spill_dir / f".flight-{os.getpid()}-{id(self)}-{self.spilled}"
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                os.unlink(path)
                if seg is not None and seg.live == 0:
                    self._close(seg)
                seg = self._segment = _Segment(fd)
            write_all(seg.fd, blk)
        except OSError:  # a full or read-only disk: keep it in memory rather than lose it
            return blk
        item = _Spilled(seg, seg.size, len(blk))
        seg.size += len(blk)
        seg.live += 1
        self.spilled += len(blk)
        return item

    def _data(self, b: int) -> bytes:
        item = self.blocks[b]
        if type(item) is bytes:
            return item
        return self._read(item)  # type: ignore[arg-type]

    def _read(self, item: _Spilled) -> bytes:
        cached, data = self._cache
        if cached is not item:
            data = os.pread(item.segment.fd, item.length, item.offset)
            self._cache = (item, data)
        return data

    def _release(self, n: int) -> None:
        """Forget the first `n` blocks (finished)."""
        for item in self.blocks[:n]:
            if type(item) is bytes:
                self.in_memory -= len(item)
            else:
                seg = item.segment  # type: ignore[union-attr]
                seg.live -= 1
                if seg.live == 0 and seg is not self._segment:
                    self._close(seg)
        del self.blocks[:n]
        del self.slow[:n]
        del self.counts[:n]
        self.head_block -= n

    def _close(self, seg: _Segment) -> None:
        if self._pins:
            self._unpinned.append(seg)
            return
        try:
            os.close(seg.fd)
        except OSError:
            pass

    def _find(self, key: bytes) -> tuple[int, int] | None:
        """Where the line of the record with id token `key` starts, from the head on."""
        pattern = b'\n{"id":' + key
        n = len(pattern)
        for b in range(self.head_block, len(self.blocks)):
            blk = self._data(b)
            at = self.head_off if b == self.head_block else 0
            while True:
                pos = blk.find(pattern, at)
                if pos < 0:
                    break
                if blk[pos + n : pos + n + 1] in (b",", b"}"):
                    return b, pos
                at = pos + 1
        return self._find_slow(key)

    def _find_slow(self, key: bytes) -> tuple[int, int] | None:
        """The same for lines whose id is not their first field."""
        for b in range(self.head_block, len(self.blocks)):
            if not self.slow[b]:
                continue
            blk = self._data(b)
            pos = self.head_off if b == self.head_block else 0
            while 0 <= pos < len(blk):
                end = blk.find(b"\n", pos + 1)
                line = blk[pos + 1 : end if end >= 0 else len(blk)]
                if id_token(line) == key:
                    return b, pos
                pos = end
        return None

    def _locate(self, line: bytes) -> tuple[int, int, bytes] | None:
        for key in _key_of(line):
            found = self._find(key)
            if found is not None:
                return found[0], found[1], key
        return None

    def finished(self, block: bytes) -> bytes:
        """Account for a block of result lines; return the part to pass on."""
        with self.lock:
            if self.suppress:
                lines = block.split(b"\n")
                kept = [ln for ln in lines if id_token(ln) not in self.suppress]
                self.suppress.difference_update(id_token(ln) for ln in lines)
                if not kept:
                    return b""
                block = b"\n".join(kept)
            end = len(block)
            while end > 0:  # from the last result back: the last one that can be placed
                cut = block.rfind(b"\n", 0, end)
                line = block[cut + 1 : end]
                found = self._locate(line)
                if found is not None:
                    break
                end = cut
            else:
                return block  # results we cannot place: passed on, no progress recorded
            b, pos, key = found
            if (b, pos) != (self.head_block, self.head_off) or key != self.head_key:
                self.head_out = set()
                self._release(b)
                self.head_block, self.head_off, self.head_key = 0, pos, key
            self.head_out.add(id_token(line))
            while cut >= 0:  # earlier results of the same record (its other chunks)
                prev = block.rfind(b"\n", 0, cut)
                line = block[prev + 1 : cut]
                if key not in _key_of(line):
                    break
                self.head_out.add(id_token(line))
                cut = prev
            return block

    def _iter_lines(self, items: list[tuple[bytes | _Spilled, int]]) -> Iterator[list[bytes]]:
        """The lines of `items` ((block, start offset) pairs), a block at a time."""
        for item, start in items:
            blk = item if type(item) is bytes else self._read(item)  # type: ignore[arg-type]
            yield [ln for ln in blk[start + 1 :].split(b"\n") if ln]

    def _from_head(self) -> list[tuple[bytes | _Spilled, int]]:
        return [
            (self.blocks[b], self.head_off if b == self.head_block else 0)
            for b in range(self.head_block, len(self.blocks))
        ]

    def _first_lines(self, n: int) -> list[bytes]:
        out: list[bytes] = []
        for lines in self._iter_lines(self._from_head()):
            out.extend(lines)
            if len(out) >= n:
                break
        return out[:n]

    def note_crash(self, isolated: bool) -> bool:
        """Count a crash; True when the next attempt should run in isolation. A crash of an
        isolated attempt (batches of one) marks the record it died on for the dead letter."""
        with self.lock:
            lines = self._first_lines(1)
            if not lines:
                return False
            if isolated:
                self.poison_pending = True
                return False
            head = id_token(lines[0])
            self.crashes[head] += 1
            return self.crashes[head] >= ISOLATE_AFTER

    def restart(self) -> tuple[Replay, tuple[Any, bytes] | None]:
        """What to feed a restarted process, and the record given up on (if any)."""
        with self.lock:
            self.suppress = set(self.head_out)
            dead = self.dead
            first = [ln for ln in self._first_lines(2 + len(dead)) if id_token(ln) not in dead]
            poison = None
            skip = -1
            if first and self.poison_pending:
                self.poison_pending = False
                # in isolation every record's results leave together: a head with results
                # is done, and the record after it is the one the stage died on
                skip = 1 if self.head_out and len(first) > 1 else 0
                key = id_token(first[skip])
                poison = (key, first[skip])
                if skip == 0:
                    self.suppress = set()
            replay = Replay(self, self._from_head(), set(dead), skip)
            if poison is not None:
                self.dead.add(poison[0])
            self._pins += 1
            return replay, poison

    def _unpin(self) -> None:
        with self.lock:
            self._pins -= 1
            if not self._pins:
                segments, self._unpinned = self._unpinned, []
                for seg in segments:
                    self._close(seg)

    def close(self) -> None:
        """Close the spill files (the run is over)."""
        with self.lock:
            segments = {id(i.segment): i.segment for i in self.blocks if type(i) is _Spilled}
            for seg in [self._segment, *self._unpinned]:
                if seg is not None:
                    segments[id(seg)] = seg
            self.blocks, self.slow, self.counts = [], [], []
            self.head_block, self.head_off, self.in_memory = 0, 0, 0
            self._segment, self._unpinned, self._cache = None, [], (None, b"")
        for seg in segments.values():
            try:
                os.close(seg.fd)
            except OSError:
                pass

    def __len__(self) -> int:
        with self.lock:
            if self.head_block >= len(self.blocks):
                return 0
            head = self._data(self.head_block)
            return head.count(b"\n", self.head_off) + sum(self.counts[self.head_block + 1 :])


class Replay:
    """The records a restarted stage is fed (Flight.restart): read a block at a time, so a
    replay from spill files never holds them all in memory."""

    def __init__(
        self,
        flight: Flight,
        items: list[tuple[bytes | _Spilled, int]],
        dead: set[bytes | None],
        skip: int,
    ) -> None:
        self.flight = flight
        self.items = items
        self.dead = dead
        self.skip = skip  # the index (among live lines) of the record given up on, or -1
        self.records = 0
        self._open = True

    def chunks(self) -> Iterator[bytes]:
        """The lines to feed, as `\n`-terminated chunks."""
        try:
            k = 0
            for lines in self.flight._iter_lines(self.items):
                if self.dead or self.skip >= k:
                    kept = []
                    for ln in lines:
                        if self.dead and id_token(ln) in self.dead:
                            continue
                        if k != self.skip:
                            kept.append(ln)
                        k += 1
                    lines = kept
                else:
                    k += len(lines)
                if lines:
                    self.records += len(lines)
                    yield b"\n".join(lines) + b"\n"
        finally:
            self.close()

    def close(self) -> None:
        if self._open:
            self._open = False
            self.flight._unpin()


# -- stages ---------------------------------------------------------------------------------------


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


class Events:
    """The supervisor's own event stream (events.ndjson), flushed on every event."""

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


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


# -- relays ---------------------------------------------------------------------------------------


class Relay(threading.Thread):
    """Copies one stage's output to the next stage's input (or to the run's output),
    keeping the books restart and resume need."""

    def __init__(
        self,
        sup: Supervisor,
        up: StageRun,
        down: StageRun | None,
        target_fd: int | None = None,
        ledger_fd: int | None = None,
        skip_keys: set[Any] | None = None,
        skip_ids: set[Any] | None = None,
    ) -> None:
        super().__init__(name=f"relay-{up.name}", daemon=True)
        self.sup = sup
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
            or sup.retries > 0
        )

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # noqa: BLE001 - a relay must never die silently
            self.sup.warn(f"relay after {self.up.name} failed: {type(exc).__name__}: {exc}")
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
        replay = self.sup.replay_for(down)
        try:
            for chunk in replay.chunks():  # a block at a time: it may come from spill files
                assert self.wfd is not None
                write_all(self.wfd, chunk)
        except OSError:
            pass  # it died again: the next write or close notices
        finally:
            replay.close()
        self.sup.events.emit("replay", stage=down.name, records=replay.records)

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


# -- the supervisor -------------------------------------------------------------------------------


@dataclass
class RunOptions:
    retries: int = 0
    backoff: float = 0.5
    timeout: float | None = None
    quiet: bool = False
    progress: bool = False
    resume: bool = False
    trace: str = "full"  # full: a span per record; batches: no ids; off: no stage traces


class Supervisor:
    """Runs one pipeline to the end and returns its exit status."""

    def __init__(
        self,
        pipeline: Pipeline,
        run: RunDirectory,
        opts: RunOptions,
        script_args: list[str] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.run_dir = run
        self.opts = opts
        self.retries = opts.retries
        self.script_args = script_args or []
        self.stages = [self._stage_run(s) for s in pipeline.stages]
        self.by_pid: dict[int, StageRun] = {}
        self.relays: list[Relay] = []
        self.signalled: int | None = None
        self.timed_out = False
        self.stderr_lock = threading.Lock()
        self.events = Events(run.events_path)
        self._stderr_threads: list[threading.Thread] = []
        self._dead_lock = threading.Lock()
        self._kill_timer: threading.Timer | None = None
        self.output_desc = "stdout"
        mb = os.environ.get("SAGE_RUN_FLIGHT_MB", "")
        self.flight_memory = int(float(mb) * 1024 * 1024) if mb.strip() else FLIGHT_MEMORY

    # -- building the processes -----------------------------------------------------------

    def _stage_run(self, stage: Stage) -> StageRun:
        env = dict(self.pipeline.env)
        env.update(stage.env)
        threads = None
        if stage.is_model and THREADS not in stage.env:
            threads = max(1, (os.cpu_count() or 1) // len(self.pipeline.model_stages))
        if stage.is_sage:
            # -P: the pipeline's directory is not put on sys.path (a `typer.py` there would run)
            argv = [sys.executable, "-P", "-m", "sage_cli", *stage.argv[1:]]
            traced = self.opts.trace != "off"
            StageEnv(
                trace_dir=str(self.run_dir.stages_dir.resolve()) if traced else None,
                trace_stage=stage.name if traced else None,
                trace_ids=self.opts.trace != "batches",
                run_id=self.run_dir.id,
                threads=threads,
            ).apply(env)
        else:
            argv = list(stage.argv)
            if threads:
                env[THREADS] = str(threads)
        return StageRun(stage, argv, env)

    def warn(self, message: str) -> None:
        if self.opts.quiet:
            return
        with self.stderr_lock:
            try:
                sys.stderr.write(f"sage run: warning: {message}\n")
                sys.stderr.flush()
            except (OSError, ValueError):
                pass

    def _open_redirect(self, stage: Stage, op: str, target: str) -> int:
        path = target if os.path.isabs(target) else os.path.join(self.pipeline.cwd, target)
        if op == "<":
            return os.open(path, os.O_RDONLY)
        append = op.endswith(">>") or (self.opts.resume and stage is self.pipeline.stages[-1])
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
        return os.open(path, flags, 0o644)

    def _spawn(self, sr: StageRun, stdin: int, stdout: int) -> None:
        """Start one attempt of a stage with the given fds (closed here in the parent)."""
        stage = sr.stage
        err_fd: int | None = None
        err_r: int | None = None
        redirect = stage.redirect("2>", "2>>")
        if stage.redirect("2>&1", "&>", "&>>"):
            err_fd = stdout
        elif redirect is not None:
            err_fd = self._open_redirect(
                stage, ">>" if redirect.op.endswith(">>") else ">", redirect.target
            )
        else:
            err_r, err_fd = os.pipe()
        sr.attempts += 1
        status: int | None = None
        try:
            argv = sr.argv
            if _SETPRIV:  # exec'd, it lets Popen use vfork: far faster starts than preexec_fn
                program = shutil.which(argv[0], path=sr.env.get("PATH"))
                if program is None:
                    raise FileNotFoundError(argv[0])
                argv = [_SETPRIV, "--pdeathsig", "KILL", "--", program, *argv[1:]]
            proc = subprocess.Popen(
                argv,
                stdin=stdin,
                stdout=stdout,
                stderr=err_fd,
                env=sr.env,
                cwd=self.pipeline.cwd,
                process_group=0,
                preexec_fn=None if _SETPRIV else _child_setup,
            )
        except FileNotFoundError:
            status = 127
            message = f"{stage.argv[0]}: command not found"
        except PermissionError:
            status = 126
            message = f"{stage.argv[0]}: permission denied"
        finally:
            for fd in {stdin, stdout, err_fd}:
                if fd is not None and fd > 2:
                    os.close(fd)
        sr.started = time.time()
        if status is not None:
            if err_r is not None:
                os.close(err_r)
            self.warn(f"stage {stage.index + 1}: {message}")
            self.events.emit("stage_start", stage=sr.name, attempt=sr.attempts, pid=None)
            self._finalize(sr, status, 0.0, 0.0)
            return
        proc.returncode = 0  # we reap it ourselves (os.wait4); keep Popen from trying
        sr.pid = proc.pid
        self.by_pid[proc.pid] = sr
        self.events.emit(
            "stage_start",
            stage=sr.name,
            attempt=sr.attempts,
            pid=proc.pid,
            argv=redact_argv(stage.argv),
            threads=sr.env.get(THREADS),
        )
        if self.signalled is not None:  # a signal came while we were starting it
            self._kill(sr, self.signalled)
        if err_r is not None:
            t = threading.Thread(target=self._pump_stderr, args=(sr, err_r), daemon=True)
            t.start()
            self._stderr_threads.append(t)

    def _pump_stderr(self, sr: StageRun, fd: int) -> None:
        """Copy a stage's stderr to its file in the run directory and to our stderr."""
        out = os.open(
            self.run_dir.stderr_path(sr.name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644
        )
        try:
            while True:
                try:
                    chunk = os.read(fd, READ_SIZE)
                except OSError:
                    break
                if not chunk:
                    break
                os.write(out, chunk)
                with self.stderr_lock:  # the stages' own messages show even with --quiet
                    try:
                        sys.stderr.write(chunk.decode("utf-8", "replace"))
                        sys.stderr.flush()
                    except (OSError, ValueError, AttributeError):
                        pass
        finally:
            os.close(fd)
            os.close(out)

    def _start_all(
        self, ledger_fd: int | None, skip_keys: set[Any] | None, skip_ids: set[Any] | None
    ) -> None:
        stages = self.stages
        last = self.pipeline.stages[-1]
        relay_all = self.retries > 0
        # where the last stage's output goes
        out_redirect = last.redirect(">", ">>", "&>", "&>>")
        if out_redirect is not None:
            target_fd = self._open_redirect(last, out_redirect.op, out_redirect.target)
            self.output_desc = out_redirect.target
        else:
            target_fd = os.dup(1)
        relay_out = relay_all or skip_ids is not None or ledger_fd is not None
        # the first stage's input
        in_redirect = stages[0].stage.redirect("<")
        if relay_all:
            for sr in stages[1:]:
                sr.flight = Flight(self.run_dir.path, self.flight_memory)
        stdin_fds: list[int] = []
        stdout_fds: list[int] = []
        for i, sr in enumerate(stages):
            if i == 0:
                stdin_fds.append(
                    self._open_redirect(sr.stage, "<", in_redirect.target)
                    if in_redirect
                    else os.dup(0)
                )
            is_last = i == len(stages) - 1
            relayed = relay_out if is_last else (relay_all or (i == 0 and skip_keys is not None))
            if is_last and not relayed:
                stdout_fds.append(target_fd)
                target_fd = -1
                continue
            r, w = os.pipe()
            stdout_fds.append(w)
            if relayed:
                sr.stdout_r = r
                if not is_last:
                    r2, w2 = os.pipe()
                    stages[i + 1].stdin_w = w2
                    stdin_fds.append(r2)
            else:
                stdin_fds.append(r)
        for i, sr in enumerate(stages):
            if sr.stdout_r is not None:
                is_last = i == len(stages) - 1
                down = None if is_last else stages[i + 1]
                self.relays.append(
                    Relay(
                        self,
                        sr,
                        down,
                        target_fd=target_fd if is_last else None,
                        ledger_fd=ledger_fd if is_last else None,
                        skip_keys=skip_keys if i == 0 else None,
                        skip_ids=skip_ids if is_last else None,
                    )
                )
        self._target_fd = target_fd
        for i, sr in enumerate(stages):
            self._spawn(sr, stdin_fds[i], stdout_fds[i])
        for relay in self.relays:
            relay.start()

    def _restart(self, sr: StageRun) -> None:
        """Start a new attempt of a crashed stage with fresh pipes to its relays."""
        index = sr.stage.index
        with sr.cond:  # the relay must have read all the dead process wrote first
            deadline = time.monotonic() + 10
            while sr.drained_gen < sr.generation and time.monotonic() < deadline:
                sr.cond.wait(0.1)
        if sr.flight is not None:
            sr.isolated = sr.flight.note_crash(sr.isolated)
            isolated = sr.isolated and sr.stage.is_sage  # batches of one, each flushed at once
            replace(
                StageEnv.read(sr.env),
                flush_every_batch=isolated,
                batch_size=1 if isolated else None,
            ).apply(sr.env)
        if index == 0:
            in_redirect = sr.stage.redirect("<")
            stdin = (
                self._open_redirect(sr.stage, "<", in_redirect.target) if in_redirect else os.dup(0)
            )
            new_w = None
        else:
            stdin, new_w = os.pipe()
        out_r, out_w = os.pipe()
        with sr.cond:
            sr.stdin_w = new_w
            sr.stdout_r = out_r
            self._spawn(sr, stdin, out_w)
            sr.generation += 1
            sr.cond.notify_all()

    def replay_for(self, sr: StageRun) -> Replay:
        """The records to feed a restarted stage; a record it crashed on twice is dead."""
        assert sr.flight is not None
        replay, poison = sr.flight.restart()
        if poison is not None:
            key, line = poison
            try:
                raw: Any = orjson.loads(line)
            except orjson.JSONDecodeError:
                raw = line.decode("utf-8", "replace")
            entry = {
                "stage": sr.name,
                "error": f"the stage crashes on this record (exit status {sr.last_crash})",
                "raw": raw,
            }
            with self._dead_lock:
                with open(self.run_dir.dead_path, "ab") as fh:
                    fh.write(orjson.dumps(entry, option=orjson.OPT_APPEND_NEWLINE))
            self.events.emit("dead_letter", stage=sr.name, id=key)
            self.warn(
                f"stage {sr.stage.index + 1} ({sr.stage.label}) crashes on record "
                f"{key!r}; it went to {self.run_dir.dead_path}"
            )
        return replay

    # -- signals and the end ----------------------------------------------------------------

    def _kill(self, sr: StageRun, signo: int) -> None:
        if sr.pid is None:
            return
        try:
            os.killpg(sr.pid, signo)
        except ProcessLookupError:
            pass
        except PermissionError:  # pragma: no cover
            pass

    def _kill_all(self, signo: int) -> None:
        for sr in list(self.by_pid.values()):
            self._kill(sr, signo)

    def _on_signal(self, signo: int, frame: Any) -> None:
        first = self.signalled is None
        self.signalled = signo if first else self.signalled
        self._kill_all(signo if first else signal.SIGKILL)
        if first:
            self._arm_kill()

    def _on_timeout(self) -> None:
        if self.signalled is not None or not self.by_pid:
            return
        self.timed_out = True
        self.signalled = signal.SIGTERM
        self.warn(f"timed out after {self.opts.timeout:g}s; stopping the stages")
        self._kill_all(signal.SIGTERM)
        self._arm_kill()

    def _arm_kill(self) -> None:
        if self._kill_timer is None:
            self._kill_timer = threading.Timer(
                KILL_GRACE_SECONDS, self._kill_all, args=(signal.SIGKILL,)
            )
            self._kill_timer.daemon = True
            self._kill_timer.start()

    def _finalize(self, sr: StageRun, status: int, cpu: float, rss_mb: float) -> None:
        with sr.cond:
            sr.status = status
            sr.final = True
            sr.cond.notify_all()
        self._emit_exit(sr, status, cpu, rss_mb, final=True)

    def _emit_exit(self, sr: StageRun, status: int, cpu: float, rss_mb: float, final: bool) -> None:
        self.events.emit(
            "stage_exit",
            stage=sr.name,
            attempt=sr.attempts,
            status=status,
            cpu=round(cpu, 4),
            rss_mb=round(rss_mb, 1),
            final=final,
        )

    def _should_restart(self, sr: StageRun, status: int) -> bool:
        if status == 0 or self.signalled is not None or sr.attempts > self.retries:
            return False
        if status in NO_RETRY or status == 128 + signal.SIGPIPE:
            return False
        return sr.stdout_r is not None and (sr.stage.index == 0 or sr.flight is not None)

    def _reap(self) -> None:
        while self.by_pid:
            try:
                pid, wstatus, usage = os.wait4(-1, 0)
            except ChildProcessError:
                break
            sr = self.by_pid.pop(pid, None)
            if sr is None:
                continue
            status = exit_status(wstatus)
            cpu = usage.ru_utime + usage.ru_stime
            rss_mb = usage.ru_maxrss / 1024.0
            sr.cpu += cpu
            sr.rss_mb = max(sr.rss_mb, rss_mb)
            if self._should_restart(sr, status):
                sr.last_crash = status
                delay = self.opts.backoff * (2 ** (sr.attempts - 1))
                in_flight = len(sr.flight) if sr.flight is not None else sr.stage.index
                self._emit_exit(sr, status, cpu, rss_mb, final=False)
                self.events.emit(
                    "restart",
                    stage=sr.name,
                    attempt=sr.attempts + 1,
                    after_status=status,
                    backoff=delay,
                    in_flight=in_flight,
                )
                self.warn(
                    f"stage {sr.stage.index + 1} ({sr.stage.label}) exited with status "
                    f"{status}; restarting it in {delay:g}s "
                    f"(attempt {sr.attempts + 1} of {self.retries + 1})"
                )
                end = time.monotonic() + delay
                while time.monotonic() < end and self.signalled is None:
                    time.sleep(min(0.05, max(0.0, end - time.monotonic())))
                if self.signalled is None:
                    self._restart(sr)
                    continue
            self._finalize(sr, status, cpu, rss_mb)

    def run(
        self,
        ledger_fd: int | None = None,
        skip_keys: set[Any] | None = None,
        skip_ids: set[Any] | None = None,
    ) -> int:
        self.events.emit(
            "run_start",
            pid=os.getpid(),
            script=str(self.pipeline.script),
            args=redact_argv(self.script_args),
            resume=self.opts.resume,
            retries=self.retries,
        )
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        timer = None
        try:
            self._start_all(ledger_fd, skip_keys, skip_ids)
            if self.opts.timeout:
                timer = threading.Timer(self.opts.timeout, self._on_timeout)
                timer.daemon = True
                timer.start()
            self._reap()
        finally:
            for sr in self.stages:  # a stage that never started (spawn failed) is final
                if not sr.final and sr.pid is None:
                    self._finalize(sr, sr.status or 127, 0.0, 0.0)
            if timer is not None:
                timer.cancel()
            for relay in self.relays:
                relay.join(timeout=10)
            for sr in self.stages:
                if sr.flight is not None:
                    sr.flight.close()
            for t in self._stderr_threads:
                t.join(timeout=5)
            if self._kill_timer is not None:
                self._kill_timer.cancel()
            if getattr(self, "_target_fd", -1) > 2:
                os.close(self._target_fd)
            for s, h in handlers.items():
                signal.signal(s, h)
        status = pipefail([sr.status for sr in self.stages])
        if self.timed_out:
            status = TIMEOUT_STATUS
        elif self.signalled == signal.SIGINT:
            status = int(ExitCode.INTERRUPTED)
        elif self.signalled == signal.SIGTERM:
            status = int(ExitCode.TERMINATED)
        self.events.emit(
            "run_stop",
            status=status,
            stages={sr.name: sr.status for sr in self.stages},
            relay={r.up.name: r.records for r in self.relays},
        )
        for relay in self.relays:
            self.events.emit("relay", stage=relay.up.name, records_out=relay.records)
            if relay.down is not None:
                self.events.emit("relay", stage=relay.down.name, records_in=relay.records)
        self.events.close()
        return status
