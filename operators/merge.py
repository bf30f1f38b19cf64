"""Interleave several NDJSON inputs as they arrive (`sage merge`).

One reader thread per input (a file, a FIFO, or `-` for a stdin stream) parses lines and hands
them to the caller in the order they arrive; each input's own order is kept. Every record is
tagged with where it came from (`_source` by default). A bad line is a BadLine naming
`FILE:LINE`, for the error policy.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import stat
import threading
from collections.abc import Iterator
from typing import Any, BinaryIO, ClassVar

from .base import Operator, OptionError, Record
from .ndjson import BadLine, numbered_lines, parse_or_bad

STDIN = "-"
#: chunks of parsed lines waiting for the caller (backpressure for fast inputs)
QUEUE_CHUNKS = 64
#: seconds between checks for Ctrl-C while every input is quiet
POLL_SECONDS = 0.25


class _End:
    """An input reached its end."""


class Merge(Operator):
    """Interleave several NDJSON inputs as they arrive, tagging each record with its source."""

    name = "merge"
    produces: ClassVar[dict[str, dict[str, Any]]] = {"_source": {"type": "string"}}

    def __init__(
        self, paths: list[str], tag: str = "_source", stdin: BinaryIO | None = None
    ) -> None:
        if not paths:
            raise OptionError("name the inputs to merge, e.g. `sage merge a.ndjson b.ndjson`")
        for path in paths:
            if path == STDIN:
                continue
            try:
                st = os.stat(path)
            except FileNotFoundError:
                raise OptionError(f"{path}: no such file; check the path") from None
            if stat.S_ISDIR(st.st_mode):
                raise OptionError(f"{path}: is a directory; merge reads NDJSON files or FIFOs")
        if paths.count(STDIN) > 1:
            raise OptionError("stdin (`-`) can be merged only once")
        self.paths = list(paths)
        self.tag = tag
        self.stdin = stdin

    def process(self, batch: list[Record]) -> list[Record]:
        return batch

    def records(self) -> Iterator[Record | BadLine | None]:
        """Records and bad lines from every input as they arrive; None while all are quiet."""
        q: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_CHUNKS)
        for path in self.paths:
            threading.Thread(
                target=self._read, args=(path, q), daemon=True, name=f"merge {path}"
            ).start()
        open_inputs = len(self.paths)
        while open_inputs:
            try:
                chunk = q.get_nowait()
            except queue.Empty:
                yield None  # nothing waiting: let the driver flush before we block
                chunk = None
                while chunk is None:
                    try:
                        chunk = q.get(timeout=POLL_SECONDS)
                    except queue.Empty:
                        continue
            if isinstance(chunk, _End):
                open_inputs -= 1
            elif isinstance(chunk, BaseException):
                raise chunk
            else:
                yield from chunk

    def _read(self, path: str, q: queue.Queue[Any]) -> None:
        origin = "stdin" if path == STDIN else path
        tag = self.tag
        try:
            if path == STDIN:
                if self.stdin is None:
                    raise OptionError("no stdin to read from")
                with _unbuffered(self.stdin) as stream:
                    self._pump(stream, origin, tag, q)
            else:
                try:
                    # unbuffered: a daemon thread blocked in a buffered read would hold the
                    # buffer's lock when the process exits (a fatal error at shutdown)
                    fh = open(path, "rb", buffering=0)  # a FIFO blocks here until a writer opens
                except PermissionError:
                    raise OptionError(f"{path}: permission denied; check its permissions") from None
                with fh:
                    self._pump(fh, origin, tag, q)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, raised there
            q.put(exc)
        finally:
            q.put(_End())

    @staticmethod
    def _pump(stream: BinaryIO, origin: str, tag: str, q: queue.Queue[Any]) -> None:
        chunk: list[Record | BadLine] = []
        for lineno, raw in numbered_lines(stream, live=True):
            if raw is None:  # the end of what one read returned: hand it over now
                if chunk:
                    q.put(chunk)
                    chunk = []
                continue
            item = parse_or_bad(raw, origin, lineno)
            if not isinstance(item, BadLine) and "_error" not in item:
                item[tag] = origin  # an `_error` record passes through untouched
            chunk.append(item)
        if chunk:
            q.put(chunk)


def _unbuffered(stream: BinaryIO) -> Any:
    """`stream` read through an unbuffered duplicate of its fd when it has one (see _read)."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return contextlib.nullcontext(stream)
    return os.fdopen(os.dup(fd), "rb", buffering=0)
