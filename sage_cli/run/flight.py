"""`--retries`: the records a stage has taken in and not finished (Flight), kept in memory and
spilled to files past FLIGHT_MEMORY, and what a restarted stage is fed again (Replay)."""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sage_cli.run.ids import _key_of, id_token

#: --retries: bytes of a stage's in-flight records a relay keeps in memory before it spills
#: them to files in the run directory (SAGE_RUN_FLIGHT_MB overrides), and the size of one file
FLIGHT_MEMORY = 8 * 1024 * 1024
SPILL_SEGMENT = 64 * 1024 * 1024
#: after this many crashes with the same record at the head, a stage is restarted in isolation
#: (batches of one, flushed at once); a crash in isolation sends the head record to the dead letter
ISOLATE_AFTER = 2


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


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
