"""What a run delivered on stdout, and the replay that skips it (`sage run --resume`).

A run bash runs notes where its stdout went, in run.json's `stdout`:
- `{"kind": "file", "path", "dev", "ino", "offset"}`: a regular file (`sage run s.sh > out`,
  `>> out`): what the run delivered is that file from `offset` on;
- `{"kind": "copy", "path"}`: a pipe, a socket or a terminal: bash writes to a pipe and the
  run's tap passes every byte on and appends it to `output.ndjson` in the run directory;
- `{"kind": "none"}`: /dev/null or nothing: nothing to keep.

`--resume` runs the whole script again and its tap drops the first bytes of the replay, as many
as the run had delivered (whole lines: a torn last line is cut off first), checking that they are
the same bytes (sha256) before it passes on anything after them. Exact for any script whose
output is a function of its input (every sage operator; model answers come from the cache);
when the replay differs, the resume stops before writing anything and says so.
"""

from __future__ import annotations

import os
import select
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

READ_SIZE = 1 << 20


def describe_stdout(fd: int, copy_path: Path) -> dict[str, Any]:
    """run.json's `stdout` for a run whose stdout is `fd`."""
    try:
        info = os.fstat(fd)
    except OSError:
        return {"kind": "none"}
    if stat.S_ISREG(info.st_mode):
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
            offset = os.lseek(fd, 0, os.SEEK_CUR)
        except OSError:
            return {"kind": "none"}
        if _appends(fd):
            offset = info.st_size  # O_APPEND: the run's writes go after what is there now
        return {
            "kind": "file",
            "path": path,
            "dev": info.st_dev,
            "ino": info.st_ino,
            "offset": offset,
        }
    if stat.S_ISCHR(info.st_mode) and not os.isatty(fd):
        return {"kind": "none"}  # /dev/null
    return {"kind": "copy", "path": str(copy_path)}


def _appends(fd: int) -> bool:
    import fcntl

    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND)
    except OSError:
        return False


#: the SHA-256 of no bytes (hashlib is imported only where a digest is computed)
_EMPTY_SHA256 = bytes.fromhex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")


@dataclass
class Delivered:
    """The bytes a run delivered (whole lines), as a length and a digest."""

    size: int = 0
    digest: bytes = _EMPTY_SHA256
    lines: int = 0


def delivered(stdout: dict[str, Any]) -> Delivered:
    """What the run whose run.json says `stdout` delivered; a torn last line is cut off."""
    kind = stdout.get("kind")
    if kind not in ("file", "copy"):
        return Delivered()
    path = stdout["path"]
    start = int(stdout.get("offset", 0)) if kind == "file" else 0
    try:
        fh = open(path, "r+b")  # noqa: SIM115 - closed below
    except OSError:
        return Delivered()
    with fh:
        if kind == "file":
            info = os.fstat(fh.fileno())
            if (info.st_dev, info.st_ino) != (stdout.get("dev"), stdout.get("ino")):
                return Delivered()  # replaced since: nothing of it is known to be delivered
        end = _after_last_newline(fh, start, os.fstat(fh.fileno()).st_size)
        if end < os.fstat(fh.fileno()).st_size:
            fh.truncate(end)  # the writer was killed mid-line
        import hashlib  # here, not at import: off the start-up path of runs that need no digest

        digest = hashlib.sha256()
        lines = 0
        fh.seek(start)
        left = end - start
        while left > 0:
            chunk = fh.read(min(READ_SIZE, left))
            if not chunk:
                break
            digest.update(chunk)
            lines += chunk.count(b"\n")
            left -= len(chunk)
        return Delivered(end - start, digest.digest(), lines)


def _after_last_newline(fh: Any, start: int, size: int) -> int:
    """The offset just after the last `\\n` at or after `start` (`start` if none)."""
    pos = size
    while pos > start:
        low = max(start, pos - 65536)
        fh.seek(low)
        chunk = fh.read(pos - low)
        at = chunk.rfind(b"\n")
        if at >= 0:
            return low + at + 1
        pos = low
    return start


class Tap(threading.Thread):
    """Copies the script's stdout (a pipe) to the run's stdout and, when `copy_fd` is given, to
    the run directory's copy; under --resume, first drops and checks `skip`'s bytes."""

    def __init__(self, read_fd: int, out_fd: int, copy_fd: int | None, skip: Delivered) -> None:
        super().__init__(name="sage-stdout", daemon=True)
        self.read_fd, self.copy_fd = read_fd, copy_fd
        self.skip = skip
        self.write_fd = -1  # the pipe's other end, for bash (closed here once bash has it)
        self.mismatch = False  # the replay did not repeat what the run had delivered
        self.on_mismatch: Any = None
        self.out = RunStdout(out_fd, copy_fd)

    def run(self) -> None:
        import hashlib  # here, not at import: off the start-up path of runs that need no digest

        left = self.skip.size
        digest = hashlib.sha256()
        checked = left == 0
        try:
            while True:
                data = os.read(self.read_fd, READ_SIZE)
                if not data:
                    break
                if not checked:
                    head, data = data[:left], data[left:]
                    digest.update(head)
                    left -= len(head)
                    if left == 0:
                        checked = True
                        if digest.digest() != self.skip.digest:
                            self._differs()
                            return
                    if not data:
                        continue
                self._write(data)
            self._write(b"", last=True)  # a last line without a newline
            if not checked:
                self._differs()  # the replay delivered less than the run had
        except _ReaderGone:
            pass
        finally:
            os.close(self.read_fd)

    def _differs(self) -> None:
        self.mismatch = True
        if self.on_mismatch is not None:
            self.on_mismatch()
        while os.read(self.read_fd, READ_SIZE):  # let the script end as it ends
            pass

    def _write(self, data: bytes, last: bool = False) -> None:
        try:
            self.out.write(data, last)
        except BrokenPipeError:
            # `sage run s.sh | head`: the reader is gone; so is ours, as it would be under bash
            raise _ReaderGone from None


class _ReaderGone(Exception):
    pass


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class RunStdout:
    """The run's stdout, as the tap (bash runs the script) and the relay (a parsed pipeline)
    write it, and the run's copy of it (`copy_fd`, what `--resume` skips), which gets each
    part right after the reader did: a kill between the two repeats that part on resume
    rather than losing it. To a pipe: whole lines, in writes of at most PIPE_BUF bytes, which
    the kernel makes atomic, so a run killed with -9 in a write blocked on a slow reader
    leaves that reader no torn last line (unless that line alone is longer than PIPE_BUF) and
    its copy exactly what the reader got; the start of a line is held until its end comes.
    Anything else gets the bytes as they come."""

    def __init__(self, fd: int, copy_fd: int | None = None) -> None:
        self.fd, self.copy_fd = fd, copy_fd
        try:
            self.lines_only = stat.S_ISFIFO(os.fstat(fd).st_mode)
        except OSError:
            self.lines_only = False
        self._partial = b""

    def write(self, data: bytes, last: bool = False) -> None:
        """Write `data` (with `last`, also a last line without its newline)."""
        if not self.lines_only:
            self._part(data)
            return
        data = self._partial + data
        cut = len(data) if last else data.rfind(b"\n") + 1
        if cut == 0 and len(data) >= READ_SIZE:  # a line this long is torn anyway
            cut = len(data)
        data, self._partial = data[:cut], data[cut:]
        view = memoryview(data)
        start, end = 0, len(data)
        while start < end:
            stop = data.rfind(b"\n", start, start + select.PIPE_BUF) + 1
            if stop <= start:  # one line longer than PIPE_BUF
                stop = data.find(b"\n", start) + 1 or end
            self._part(view[start:stop])
            start = stop

    def _part(self, data: bytes | memoryview) -> None:
        write_all(self.fd, data)
        if self.copy_fd is not None:
            write_all(self.copy_fd, data)


def appends_in(text: str) -> list[tuple[int, str]]:
    """The lines of a script that append to a file (`>>`, `&>>`, `tee -a`): a replay would
    append their output a second time, so `--resume` cannot be exact for them."""
    import shlex

    found = []
    for number, line in enumerate(text.splitlines(), 1):
        if ">>" not in line and "tee" not in line:
            continue
        try:
            words = list(shlex.shlex(line, posix=True, punctuation_chars=True))
        except ValueError:  # an open quote: the line goes on; look at its own words only
            words = line.split()
        for i, word in enumerate(words):
            if word.startswith("#"):
                break
            tee_append = word == "tee" and any(w in ("-a", "--append") for w in words[i + 1 :])
            if word in (">>", "&>>") or tee_append:
                found.append((number, line.strip()))
                break
    return found
