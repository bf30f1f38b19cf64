"""NDJSON in and out (DESIGN §3).

Reading: files or stdin (`-`), in large blocks, blank lines skipped, every line numbered so an
error can say `FILE:LINE`. Before a read that would block, the reader calls `on_idle` so the
writer can flush: output is never held back while we wait for input.

Writing: records are serialised with orjson into a buffer that is written out in blocks, when it
grows past BLOCK_SIZE, when the caller asks, and (via `maybe_flush`) at least every FLUSH_SECONDS.
"""

from __future__ import annotations

import itertools
import os
import select
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import orjson

from sage_cli.errors import DataError, SageError, UsageError
from sage_cli.operators.ndjson import (  # noqa: F401 - re-exported: line parsing is shared with sources
    QUOTE_LIMIT,
    BadLine,
    LineTooLong,
    complete_lines,
    describe_json_error,
    dump_record,
    exact_numbers,
    may_hold_long_integer,
    parse_line,
)

BLOCK_SIZE = 64 * 1024
#: reads from a file: small enough that a block's records stay in the CPU cache from parsing to
#: writing (1 MiB blocks measured ~12% slower than 64 KiB on `sage map r`, see tests/bench)
FILE_BLOCK_SIZE = 64 * 1024
FLUSH_SECONDS = 0.1

Record = dict[str, Any]
_loads = orjson.loads
_dumps = orjson.dumps
_NL = orjson.OPT_APPEND_NEWLINE
#: a batch whose NDJSON is this big makes the process keep freed heap (keep_freed_heap)
BIG_WRITE = 24 * 1024
_heap_kept: list[bool] = []
_ONLY_DICTS = frozenset((dict,))


def open_input(path: str) -> int | BinaryIO:
    """Open an input path (or `-` for stdin) as a raw fd, with a one-line error on failure.

    stdin that is not a real file descriptor (a test harness) comes back as a binary stream.
    """
    if path == "-":
        if sys.stdin is None:  # descriptor 0 was closed before the stage started (`<&-`)
            raise SageError("stdin is closed (`<&-`): give the stage a file or a pipe to read")
        try:
            return sys.stdin.fileno()
        except (AttributeError, OSError, ValueError):
            return sys.stdin.buffer
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file; check the path") from None
    except PermissionError:
        # like a missing file: the argument names an input this user cannot read (exit 2)
        raise UsageError(f"{path}: permission denied; check its permissions") from None
    except OSError as exc:
        raise SageError(f"{path}: cannot open: {exc.strerror}") from None
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        raise UsageError(
            f"{path}: is a directory; NDJSON input must be a file (use `sage source DIR`)"
        )
    return fd


def read_blocks(
    fd: int | BinaryIO,
    on_idle: Callable[[], None] | None = None,
    idle_interval: float | None = None,
) -> Iterator[bytes]:
    """Yield runs of complete lines (joined, without the final `\\n`) as they arrive on `fd`.

    Before blocking on a pipe or terminal, call `on_idle` (and again every `idle_interval`
    seconds while nothing arrives). A final line without `\\n` is still yielded.
    """
    if isinstance(fd, int):
        is_regular = stat.S_ISREG(os.fstat(fd).st_mode)
        raw_read = os.read
    else:  # a binary stream with no fd: read it like a file
        is_regular = True
        stream = fd

        def raw_read(_fd: Any, n: int) -> bytes:
            return stream.read(n) or b""

    size = FILE_BLOCK_SIZE if is_regular else BLOCK_SIZE
    read: Callable[[Any, int], bytes] = raw_read

    def chunks() -> Iterator[bytes]:
        while True:
            if not is_regular and on_idle is not None:
                ready, _, _ = select.select([fd], [], [], 0)
                while not ready:
                    on_idle()
                    ready, _, _ = select.select([fd], [], [], idle_interval)
            try:
                chunk = read(fd, size)
            except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                continue
            except IsADirectoryError:
                raise UsageError("input is a directory; use `sage source DIR`") from None
            if not chunk:
                return
            yield chunk

    return complete_lines(chunks())


@dataclass
class Block:
    """Records read together. `items` holds records and BadLines in input order.

    `lines[i]` is the line number of `items[i]`; None means `first_line + i`. A `clean` block
    holds only records without `_error` and no gaps, so the driver can batch it with no checks.
    """

    origin: str
    first_line: int
    items: list[Any]
    lines: list[int] | None
    clean: bool


class RecordReader:
    """Reads NDJSON records from a list of inputs, block by block, with line numbers."""

    def __init__(
        self,
        paths: list[str] | None = None,
        on_idle: Callable[[], None] | None = None,
        idle_interval: float | None = None,
        stdin: int | BinaryIO | None = None,
        stdin_after: int = 0,
    ) -> None:
        self.paths = list(paths) if paths else ["-"]
        self.on_idle = on_idle
        self.idle_interval = idle_interval
        self.stdin = stdin  # what `-` reads (default: fd 0)
        #: lines of the input that come before what `-` reads (a keeper's restarted worker is
        #: fed from line N+1): its lines are numbered from N+1
        self.stdin_after = stdin_after

    def blocks(self) -> Iterator[Block]:
        for path in self.paths:
            origin = "stdin" if path == "-" else path
            fd = self.stdin if path == "-" and self.stdin is not None else open_input(path)
            try:
                yield from self._blocks_of(fd, origin, self.stdin_after if path == "-" else 0)
            finally:
                if isinstance(fd, int) and path != "-":
                    os.close(fd)

    def _blocks_of(self, fd: int | BinaryIO, origin: str, lineno: int = 0) -> Iterator[Block]:
        loads = _loads
        blocks = read_blocks(fd, self.on_idle, self.idle_interval)
        while True:
            try:
                data = next(blocks)
            except StopIteration:
                return
            except LineTooLong as exc:  # no newline for MAX_LINE_BYTES: not NDJSON
                raise DataError(f"{origin}:{lineno + 1}: {exc}") from None
            lines = data.split(b"\n")
            first = lineno + 1
            lineno += len(lines)
            # Fast path: every line parses to an object and none can carry `_error`.
            try:
                items = [loads(raw) for raw in lines]
            except orjson.JSONDecodeError:
                pass
            else:
                if _ONLY_DICTS.issuperset(map(type, items)):
                    if may_hold_long_integer(data):  # integers beyond 64 bits stay exact
                        items = list(map(exact_numbers, lines, items))
                    # One dict lookup per record finds an `_error` key however it is spelled
                    # (`"_erro\u0072"` too, found writing the fuzz tests), and costs less than
                    # scanning the block's bytes for it (20 ns a record vs 0.5 ns a byte).
                    clean = not any(map(dict.__contains__, items, _ERROR_KEY))
                    yield Block(origin, first, items, None, clean)
                    continue
            yield self._slow_block(origin, first, lines)

    @staticmethod
    def _slow_block(origin: str, first: int, lines: list[bytes]) -> Block:
        items: list[Any] = []
        numbers: list[int] = []
        for offset, raw in enumerate(lines):
            line = first + offset
            if not raw.strip():
                continue  # blank lines are skipped
            parsed = parse_line(raw)
            items.append(
                parsed if type(parsed) is dict else BadLine(origin, line, str(parsed), raw)
            )
            numbers.append(line)
        return Block(origin, first, items, numbers, False)


class WriteGuard:
    """Holds back SIGINT/SIGTERM while stdout is being written.

    A handler that raised between a partial `os.write` and the bookkeeping after it would leave
    half a record on stdout (or write a block twice). The handlers `sage_cli.cli.guard.guarded`
    installs call `hold` first: during a write it notes the signal and returns, and the writer
    raises it once the block is out. A second signal during the same write is not held, so a
    consumer that never reads cannot make a stage ignore Ctrl-C.
    """

    def __init__(self) -> None:
        self.active = False
        self.pending: type[BaseException] | None = None

    def hold(self, exc: type[BaseException]) -> bool:
        if self.active and self.pending is None:
            self.pending = exc
            return True
        return False

    def raise_pending(self) -> None:
        exc, self.pending = self.pending, None
        if exc is not None:
            raise exc()


WRITE_GUARD = WriteGuard()


def keep_freed_heap() -> None:
    """Have glibc keep freed memory at the top of the heap for the next batch instead of giving
    it back at once. Batches of ~60 KB of NDJSON or more (`--batch-size 1024` of small records,
    or big records) freed and took that memory again per batch: `sage map --batch-size 1024`
    over 1M records made 16,500 brk calls and spent 1 s of system time on them and the page
    faults after (1.8 s wall against 0.7 s). Done once, on the first such batch: ctypes is not
    imported by stages that never write one."""
    _heap_kept.append(True)
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
        # blocks up to 4 MB from the heap (not a fresh mmap each, faulted in page by page),
        # and up to 8 MB of freed heap kept for the next batch
        mallopt(_M_MMAP_THRESHOLD, 4 * 1024 * 1024)
        mallopt(_M_TRIM_THRESHOLD, 8 * 1024 * 1024)
    except (OSError, AttributeError, ImportError):  # not glibc (musl has no mallopt): as is
        pass


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


class RecordWriter:
    """Buffered NDJSON writer on a raw fd (stdout's by default).

    When stdout is not a real file descriptor (a test harness), it writes to `sys.stdout`.
    """

    #: a writer that feeds another stage says when that stage wants no more (Ray); stdout never
    done = False

    def __init__(self, fd: int | None = None, line_buffered: bool = False) -> None:
        self.stream: BinaryIO | None = None
        if fd is None:
            try:
                fd = sys.stdout.fileno()
                sys.stdout.flush()
            except (AttributeError, OSError, ValueError):
                self.stream = sys.stdout.buffer
                fd = -1
        self.fd = fd
        self.line_buffered = line_buffered
        self._parts: list[bytes] = []
        self._size = 0
        self._last_flush = time.monotonic()
        self.records_written = 0
        #: called before each write to the fd (a keeper's worker: its trace reaches the disk
        #: before the output it describes can be committed)
        self.before_flush: Callable[[], None] | None = None

    def write(self, records: list[Record]) -> None:
        if not records:
            return
        dumps = _dumps
        opt = _NL
        try:
            # OPT_APPEND_NEWLINE, not b"\n".join(map(dumps, ...)): the join variant measured
            # several times slower here (orjson's buffers without the option cost page faults)
            data = b"".join([dumps(r, option=opt) for r in records])
        except TypeError:
            data = b"".join([dump_record(r) for r in records])
        self.records_written += len(records)
        self._parts.append(data)
        self._size += len(data)
        if len(data) >= BIG_WRITE and not _heap_kept:
            keep_freed_heap()
        if self.line_buffered or self._size >= BLOCK_SIZE:
            self.flush()

    def write_raw(self, data: bytes) -> None:
        """Append bytes that are not a record (a keeper's commit marker) in their place."""
        self._parts.append(data)
        self._size += len(data)
        if self.line_buffered:
            self.flush()

    def maybe_flush(self) -> None:
        """Flush if output has waited FLUSH_SECONDS or more."""
        if self._parts and time.monotonic() - self._last_flush >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._parts:
            return
        if self.before_flush is not None:
            self.before_flush()
        data = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        if self.stream is not None:
            self._parts = []
            self._size = 0
            self.stream.write(data)
            self.stream.flush()
            return
        # A signal (SIGINT/SIGTERM raise in this thread) can land between two partial writes
        # to a slow pipe: keep what was not written, so the flush on the way out completes the
        # record instead of leaving half a line.
        view = memoryview(data)
        total = len(data)
        done = 0
        guard = WRITE_GUARD
        guard.active = True
        try:
            while done < total:
                done += os.write(self.fd, view[done:])  # EPIPE raises BrokenPipeError
        except BrokenPipeError:
            raise
        except OSError as exc:  # a full disk under `> out.ndjson`: say which file it was
            if exc.filename is None:
                exc.filename = "stdout" if self.fd == 1 else f"output (fd {self.fd})"
            raise
        finally:
            guard.active = False
            rest = data[done:] if done < total else b""
            self._parts = [rest] if rest else []
            self._size = len(rest)
        if guard.pending is not None:
            guard.raise_pending()


#: map() stops at the shortest iterable, so one endless repeat serves every block
_ERROR_KEY = itertools.repeat("_error")


def loads_record(raw: bytes | str, origin: str = "input", line: int = 1) -> Record:
    """Parse one line into a record or raise DataError naming where it came from."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", errors="surrogateescape")
    result = parse_line(raw)
    if isinstance(result, str):
        raise DataError(f"{origin}:{line}: {result}")
    return result


def read_table(path: str) -> list[Record]:
    """Read a whole NDJSON file (a lookup table, a gold file) or fail with FILE:LINE."""
    out: list[Record] = []
    for block in RecordReader([path]).blocks():
        for item in block.items:
            if isinstance(item, BadLine):
                raise DataError(item.message())
            out.append(item)
    return out
