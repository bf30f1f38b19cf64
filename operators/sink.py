"""Write records to a file, a stream or a terminal (`sage sink`).

- With no file and no terminal: NDJSON passes through (process returns the batch), so a sink can
  end a pipe and lose nothing.
- `to=PATH`: written atomically. Output goes to a temporary file in the same directory, which
  replaces PATH (os.replace) only at close(), after a successful run. If the run fails or is
  interrupted, the temporary file is removed and PATH keeps its old content.
- `fmt`: ndjson (one record a line), json (one array), csv (the union of top-level keys, in order
  of first appearance, as columns; nested values as JSON), md (a markdown table, same columns).
  csv and md need every record before the header can be written: they hold the input and write it
  at close(). ndjson and json are written as records arrive. llm: one line per record,
  `{"id", "content"}` only (the id as a string, the text), the shape simonw's `llm embed-multi
  --format nl` reads (it takes the first value as the id and joins the others as the text, so
  a `metadata` object or a number would break it).
- `pretty=True`: records rendered for a person with rich (fields aligned, long text wrapped).

Records with `_error` never reach an operator: the driver passes them through to stdout.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import weakref
from typing import Any, BinaryIO, TextIO

from .base import (
    Operator,
    OptionError,
    OutputFailed,
    Record,
    RecordError,
    record_text,
    terminal_safe,
)
from .ndjson import dump_record, dumps_value

FORMATS = ("ndjson", "json", "csv", "md", "llm")
WHOLE_INPUT = ("csv", "md")


class Sink(Operator):
    """Write records to a file (atomically), stdout, or the terminal."""

    name = "sink"
    stateless = False

    def __init__(
        self,
        fmt: str = "ndjson",
        to: str | None = None,
        *,
        stream: BinaryIO | None = None,
        pretty: bool = False,
        console_file: TextIO | None = None,
        width: int | None = None,
    ) -> None:
        if fmt not in FORMATS:
            raise OptionError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
        if pretty and to is not None:
            raise OptionError("--pretty renders on the terminal; it cannot go with --to")
        self.fmt = fmt
        self.to = to
        self.stream = stream
        self.pretty = pretty
        self.console_file = console_file
        self.width = width
        self.memory = "whole-input" if fmt in WHOLE_INPUT else "streaming"  # type: ignore[misc]
        self.held: list[Record] = []
        self.count = 0
        self._out: BinaryIO | None = None
        self._tmp: str | None = None
        self._cleanup: weakref.finalize | None = None
        self._console: Any = None

    # -- lifecycle -------------------------------------------------------------------------

    def setup(self) -> None:
        if self.to is not None:
            self._open_temp(self.to)
            self._out = self._file
        elif not self.pretty and self.fmt != "ndjson":
            if self.stream is None:
                raise OptionError(f"--format {self.fmt} needs an output stream or --to FILE")
            self._out = self.stream
        if self._out is not None and self.fmt == "json":
            self._out.write(b"[")
        if self.pretty:
            from rich.console import Console

            self._console = Console(
                file=self.console_file, width=self.width, soft_wrap=False, highlight=False
            )

    def process(self, batch: list[Record]) -> list[Record]:
        if self.pretty:
            for record in batch:
                self._render(record)
            return []
        if self._out is None:  # NDJSON on stdout: the driver writes it
            return batch
        if self.fmt in WHOLE_INPUT:
            self.held.extend(batch)
        elif self.fmt == "ndjson":
            self._write(b"".join([_dump_line(r) for r in batch]))
        elif self.fmt == "llm":
            self._write(b"".join([_dump_line(llm_shape(r)) for r in batch]))
        else:  # json: one array, elements separated by ",\n"
            sep = b",\n" if self.count else b"\n"
            self._write(sep + b",\n".join(_dump(r) for r in batch))
        self.count += len(batch)
        return []

    def _write(self, data: bytes) -> None:
        assert self._out is not None
        if self.to is None:
            self._out.write(data)
            return
        try:
            self._out.write(data)
        except OSError as exc:
            raise self._failed(exc) from None

    def _failed(self, exc: OSError) -> OutputFailed:
        """A write to the temporary file failed (disk full...): drop it, say what is kept."""
        assert self.to is not None
        self.abandon()
        kept = (
            f"{self.to} is untouched (the partial output was removed)"
            if os.path.lexists(self.to)
            else f"{self.to} was not created"
        )
        return OutputFailed.from_os_error(f"--to {self.to}: cannot write", exc, kept)

    def close(self) -> list[Record]:
        out = self._out
        if out is None:
            return []
        if self.fmt == "json":
            self._write(b"\n]\n" if self.count else b"]\n")
        elif self.fmt == "csv":
            self._write(to_csv(self.held))
        elif self.fmt == "md":
            self._write(to_markdown(self.held))
        self.held = []
        if self.to is not None:
            try:
                self._commit()
            except OSError as exc:
                raise self._failed(exc) from None
        else:
            out.flush()
        self._out = None
        return []

    # -- atomic file -----------------------------------------------------------------------

    def _open_temp(self, path: str) -> None:
        directory = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise OptionError(f"--to {path}: is a directory; name a file")
        if not os.path.isdir(directory):
            raise OptionError(f"--to {path}: no such directory {directory}")
        try:
            fd, tmp = tempfile.mkstemp(
                dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp"
            )
        except PermissionError:
            raise OptionError(
                f"--to {path}: cannot write in {directory}; check its permissions"
            ) from None
        except OSError as exc:  # no inode left, read-only file system
            kept = f"{path} is untouched" if os.path.lexists(path) else f"{path} was not created"
            raise OutputFailed.from_os_error(f"--to {path}: cannot write", exc, kept) from None
        self._tmp = tmp
        self._file = os.fdopen(fd, "wb", buffering=1024 * 1024)
        # If the run ends any other way than close(), the temporary file goes and PATH stays.
        self._cleanup = weakref.finalize(self, _discard, self._file, tmp)

    def _commit(self) -> None:
        assert self._tmp is not None and self.to is not None
        fh = self._file
        fh.flush()
        os.fsync(fh.fileno())
        os.fchmod(fh.fileno(), _mode_for(self.to))
        fh.close()
        os.replace(self._tmp, self.to)
        if self._cleanup is not None:
            self._cleanup.detach()
        self._tmp = None

    def abandon(self) -> None:
        """Drop the temporary file; the destination keeps its old content."""
        if self._cleanup is not None:
            self._cleanup()

    # -- terminal --------------------------------------------------------------------------

    def _render(self, record: Record) -> None:
        from rich.table import Table
        from rich.text import Text

        console = self._console
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="bold cyan", no_wrap=True, justify="right")
        grid.add_column(overflow="fold")
        error = "_error" in record
        for key, value in record.items():
            shown = value if isinstance(value, str) else dumps_value(value).decode()
            grid.add_row(
                Text(terminal_safe(str(key)), style="bold red" if key == "_error" else ""),
                Text(terminal_safe(shown)),
            )
        console.rule(style="red" if error else "dim")
        console.print(grid)


def _discard(fh: Any, tmp: str) -> None:
    with contextlib.suppress(OSError):
        fh.close()
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def _mode_for(path: str) -> int:
    """The mode the file gets: the old file's, or what a new file would get under the umask."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _dump(record: Record) -> bytes:
    return dumps_value(record)


_dump_line = dump_record


def columns(records: list[Record]) -> list[str]:
    """The union of top-level keys, in order of first appearance."""
    seen: dict[str, None] = {}
    for record in records:
        for key in record:
            seen.setdefault(key, None)
    return list(seen)


def cell(value: Any) -> str:
    """A field as text: strings as they are, null as empty, anything else as JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return _dump(value).decode()


def llm_shape(record: Record) -> Record:
    """`{"id", "content"}`: what `llm embed-multi --format nl` reads."""
    if "id" not in record:
        raise RecordError("record has no 'id' (llm embed-multi needs one per record)")
    return {"id": str(record["id"]), "content": record_text(record)}


def to_csv(records: list[Record]) -> bytes:
    import csv

    if not records:
        return b""
    cols = columns(records)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    for record in records:
        writer.writerow([cell(record.get(c)) for c in cols])
    return buf.getvalue().encode("utf-8")


def to_markdown(records: list[Record]) -> bytes:
    if not records:
        return b""
    cols = columns(records)

    def md(text: str) -> str:
        return (
            text.replace("\\", "\\\\")
            .replace("|", "\\|")
            .replace("\r\n", "<br>")
            .replace("\n", "<br>")
        )

    lines = [
        "| " + " | ".join(md(c) for c in cols) + " |",
        "|" + "|".join(" --- " for _ in cols) + "|",
    ]
    for record in records:
        lines.append("| " + " | ".join(md(cell(record.get(c))) for c in cols) + " |")
    return ("\n".join(lines) + "\n").encode("utf-8")
