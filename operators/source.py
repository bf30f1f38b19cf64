"""Read files, directories, globs or a stream as records (`sage source`).

Formats, chosen by extension (or forced with `fmt`):

- text (.txt, .md, .markdown, .rst, files without an extension, and any other named file): one
  record per file, `{"id", "text", "metadata": {"path", "mtime", "bytes"}}`. Invalid UTF-8 is
  decoded with U+FFFD replacement characters and the record's `_warnings` list says so. Binary
  content (a NUL byte in the first 8 KiB) is refused: one file's error (a BadFile).
- pdf (.pdf): one record per page, id `PATH:N`, metadata `page` (from 1), `pages`, `title`.
- html (.html, .htm, .xhtml): the main text (operators.documents), metadata `title`.
- docx (.docx): the text with headings as markdown `#` lines, metadata `title`.
- any extension given a converter (`convert={".doc": argv}`): the program's stdout, as text.
- `NAME.gz`: decompressed, then read as NAME would be.
- ndjson (.ndjson, .jsonl; stdin by default): records as they are. A line that is not a JSON
  object is a BadLine with `FILE:LINE` for the error policy.
- json (.json): an array of objects (one record each) or one object (a UTF-8 BOM is allowed).
- csv (.csv): the first non-blank row names the fields; values stay strings (null for a
  field a short row lacks); a row with more fields than the header is a BadLine.
- raw (`raw=True`, `-R`): every non-blank line of any file becomes `{"id", "text"}`.

Ids: a record that has an `id` keeps it. Otherwise the id is path-based (`PATH` for a whole
file, `PATH:LINE` for a line or row, `PATH:N` for the N-th element of a JSON array) or, with
`id_by="content"`, the first 16 hex digits of the SHA-256 of the text (or of the canonical JSON of
a record without text). A record with `content` and no `text` gets `text` (the alias is renamed).

Directories are read recursively, in sorted order, skipping hidden entries, symbolic links that
lead out of the walked tree (a link named as an argument is followed; links that stay inside it
are followed, a directory once) and files whose extension is not one of the above (with a
forced `fmt`, every file is read). Every skipped entry is recorded in `skipped` (path, reason)
and `notes()` sums them up for stderr. With `watch=True` the source emits every matching file
once, then each file again whenever it is created or its content changes, and a deletion
record `{"id": PATH, "deleted": true, "metadata": {"path": PATH}}` when an emitted file is
removed, until interrupted.
"""

from __future__ import annotations

import csv
import fnmatch
import glob
import hashlib
import io
import os
import stat
import time
from collections.abc import Iterator
from typing import Any, BinaryIO, ClassVar

import orjson

from .base import Operator, OptionError, Record, add_warning
from .documents import READERS, DocumentError, gunzip, looks_binary, run_converter
from .ndjson import (
    BadLine,
    describe_json_error,
    dumps_value,
    exact_numbers,
    line_blocks,
    may_hold_long_integer,
    numbered_lines,
    parse_or_bad,
)

#: --watch: a line file without its last newline (or JSON that does not parse) that has not
#: changed for this long is read as it is; before that it is taken to be still being written
WATCH_SETTLE_SECONDS = 5.0

#: extension -> format, for files found in directories and for `fmt="auto"`
EXTENSIONS: dict[str, str] = {
    ".txt": "text",
    ".md": "text",
    ".markdown": "text",
    ".rst": "text",
    ".ndjson": "ndjson",
    ".jsonl": "ndjson",
    ".json": "json",
    ".csv": "csv",
    ".pdf": "pdf",
    ".html": "html",
    ".htm": "html",
    ".xhtml": "html",
    ".docx": "docx",
}
FORMATS = ("auto", "text", "ndjson", "json", "csv", "pdf", "html", "docx")
#: formats whose files are documents read whole (by operators.documents)
DOCUMENT_FORMATS = frozenset(READERS)
#: why a walked entry was skipped -> how the summary line names it
SKIP_REASONS = {
    "extension": "unknown extension",
    "binary": "binary content",
    "outside": "symlink leading out of the tree",
    "broken": "broken symlink",
    "special": "not a regular file",
    "hidden": "hidden",
}
STDIN = "-"
_loads = orjson.loads

#: what the records iterable yields: a record, a bad line, or None ("idle: flush now")
Item = Record | BadLine | None


class BadFile(BadLine):
    """A whole file that cannot be read as what it is (binary, a corrupt PDF...): one file's
    error under the error policy, reported as `PATH: why`."""

    def message(self) -> str:
        return f"{self.origin}: {self.reason}"


def inner_name(path: str) -> tuple[str, bool]:
    """The name a file is read as (`a.txt.gz` -> `a.txt`) and whether it is gzip-compressed."""
    if path.lower().endswith(".gz") and path != STDIN:
        return path[:-3], True
    return path, False


def extension(path: str) -> str:
    """The extension that decides how a file is read: `.pdf`, `.txt` for `a.txt.gz`, or ''."""
    name, _ = inner_name(os.path.basename(path))
    return os.path.splitext(name)[1].lower()


def _permission_error(path: str) -> OptionError:
    # like a missing file: the argument names an input this user cannot read (exit 2)
    return OptionError(f"{path}: permission denied; check its permissions")


def _missing(path: str) -> OptionError:
    return OptionError(f"{path}: no such file or directory; check the path")


class Source(Operator):
    """Read files, directories, globs or stdin as records."""

    name = "source"
    produces: ClassVar[dict[str, dict[str, Any]]] = {
        "id": {"type": "string"},
        "text": {"type": "string"},
        "metadata": {
            "type": "object",
            "properties": {
                "path": {"type": "string"},
                "mtime": {"type": "number"},
                "bytes": {"type": "integer"},
                "page": {"type": "integer", "description": "PDF: the page, from 1"},
                "pages": {"type": "integer", "description": "PDF: its number of pages"},
                "title": {"type": "string", "description": "PDF, HTML, DOCX: the title"},
            },
        },
        "_warnings": {"type": "array", "items": {"type": "string"}},
    }

    def __init__(
        self,
        paths: list[str] | None = None,
        *,
        raw: bool = False,
        id_by: str = "path",
        fmt: str = "auto",
        watch: bool = False,
        stdin: BinaryIO | None = None,
        watch_step_ms: int = 50,
        convert: dict[str, list[str]] | None = None,
        verbose: bool = False,
    ) -> None:
        if id_by not in ("path", "content"):
            raise OptionError(f"--id-by {id_by!r}: expected path or content")
        if fmt not in FORMATS:
            raise OptionError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
        self.paths = list(paths) if paths else [STDIN]
        if watch and STDIN in self.paths:
            raise OptionError("--watch needs files or directories, not stdin")
        self.raw = raw
        self.by_content = id_by == "content"
        self.fmt = fmt
        self.watch = watch
        self.stdin = stdin
        self.watch_step_ms = watch_step_ms
        self._seen: dict[str, bytes] = {}  # path -> digest of what was last emitted (watch)
        self._unsettled: dict[str, str] = {}  # real path -> path of a file still being written
        self.convert = {k.lower(): v for k, v in (convert or {}).items()}
        self.verbose = verbose
        self.skipped: list[tuple[str, str]] = []  # (path, reason) of every entry walked past
        #: (path, why) of every file refused as one file's error (under --on-error skip or
        #: emit the read goes on; --verbose names them at the end, with the skipped ones)
        self.unreadable: list[tuple[str, str]] = []
        # files found in a directory only because they may be text (no extension, or any file
        # under --format text): binary content skips them (counted), it is not an error
        self._maybe_text: set[str] = set()

    def process(self, batch: list[Record]) -> list[Record]:
        return batch

    # -- records ---------------------------------------------------------------------------

    def records(self) -> Iterator[Item]:
        """Everything the inputs hold, in order; None marks a moment when input is idle."""
        if self.watch:
            yield from self._watch()
            return
        for path in self.expand():
            for item in self.read_path(path):
                if isinstance(item, BadFile):
                    self.unreadable.append((item.origin, item.reason))
                yield item

    def expand(self) -> list[str]:
        """The inputs named by `paths`: files, directories walked in sorted order, globs."""
        out: list[str] = []
        seen: set[str] = set()

        def add(path: str, walked: bool = False) -> None:
            key = path if path == STDIN else os.path.realpath(path)
            if key not in seen:
                seen.add(key)
                shown = path if path == STDIN else os.path.normpath(path)
                out.append(shown)
                if walked and self.format_of(shown) == "text":
                    if self.fmt == "text" or not extension(shown):
                        self._maybe_text.add(shown)

        for arg in self.paths:
            if arg == STDIN:
                add(arg)
            elif os.path.isdir(arg):
                for path in walk(arg, self.listed, self.skipped):
                    add(path, walked=True)
            elif os.path.lexists(arg):
                add(arg)
            elif glob.has_magic(arg):
                matches = sorted(glob.glob(arg, recursive=True))
                if not matches:
                    raise OptionError(f"{arg}: no file matches this pattern")
                for match in matches:
                    if os.path.isdir(match):
                        for path in walk(match, self.listed, self.skipped):
                            add(path, walked=True)
                    else:
                        add(match)
            else:
                raise _missing(arg)
        return out

    def listed(self, path: str) -> bool:
        """Whether a file found in a directory is read: a known extension, one with a
        converter, no extension at all, or any file when a format is forced."""
        if self.fmt != "auto":
            return True
        ext = extension(path)
        return not ext or ext in EXTENSIONS or ext in self.convert

    def format_of(self, path: str) -> str:
        if self.raw:
            return "raw"
        if self.fmt != "auto":
            return self.fmt
        if path == STDIN:
            return "ndjson"
        ext = extension(path)
        if ext in self.convert:
            return "convert"
        return EXTENSIONS.get(ext, "text")

    def notes(self) -> list[str]:
        """Lines for stderr at the end: what was skipped, summed up (and listed if verbose),
        and with --verbose the files refused as errors."""
        if self.verbose:
            lines = [f"could not read {path}: {why}" for path, why in self.unreadable]
        elif self.unreadable:
            lines = [f"could not read {len(self.unreadable)} file(s); --verbose names them"]
        else:
            lines = []
        if not self.skipped:
            return lines
        if self.verbose:
            lines += [f"skipped {path} ({SKIP_REASONS[why]})" for path, why in self.skipped]
        by_reason: dict[str, int] = {}
        by_ext: dict[str, int] = {}
        for path, why in self.skipped:
            by_reason[why] = by_reason.get(why, 0) + 1
            if why == "extension":
                name, gz = inner_name(os.path.basename(path))
                ext = os.path.splitext(name)[1].lower() + (".gz" if gz else "")
                by_ext[ext] = by_ext.get(ext, 0) + 1
        parts = []
        for why, label in SKIP_REASONS.items():
            if why in by_reason:
                detail = ""
                if why == "extension":
                    top = sorted(by_ext.items(), key=lambda kv: (-kv[1], kv[0]))
                    shown = ", ".join(f"{e} {n}" for e, n in top[:8])
                    more = f", {len(top) - 8} more" if len(top) > 8 else ""
                    detail = f" ({shown}{more})"
                parts.append(f"{label} {by_reason[why]}{detail}")
        hint = "" if self.verbose else "; --verbose lists them"
        if "extension" in by_reason:
            hint += "; read them with --format text or --convert EXT=COMMAND"
        lines.append(f"skipped {len(self.skipped)} file(s): {', '.join(parts)}{hint}")
        return lines

    def read_path(self, path: str) -> Iterator[Item]:
        """The records of one input."""
        fmt = self.format_of(path)
        if path == STDIN:
            stream = self.stdin
            if stream is None:
                raise OptionError("no stdin to read from")
            if fmt in ("raw", "ndjson"):
                yield from self._lines(stream, "stdin", fmt, live=not _is_regular(stream))
            elif fmt in DOCUMENT_FORMATS:
                try:
                    yield from self._document("stdin", read_all(stream), fmt, None)
                except DocumentError as exc:
                    yield BadFile("stdin", 0, str(exc), b"")
            else:
                yield from self._whole("stdin", read_all(stream), fmt, None)
            return
        gz = inner_name(path)[1]
        if fmt in ("raw", "ndjson") and not gz:
            with open_file(path) as fh:
                yield from self._lines(fh, path, fmt, live=False)
            return
        with open_file(path) as fh:
            st = os.fstat(fh.fileno())
            data = b"" if fmt == "convert" and not gz else read_all(fh)
        try:
            if gz:
                data = gunzip(data)
            if fmt == "convert":  # the program reads the file itself, or what gzip gave
                argv = self.convert[extension(path)]
                data = run_converter(argv, path, data if gz else None)
                fmt = "text"
            elif fmt in DOCUMENT_FORMATS:
                yield from self._document(path, data, fmt, st)
                return
        except DocumentError as exc:
            yield BadFile(path, 0, str(exc), b"")
            return
        if fmt in ("raw", "ndjson"):
            yield from self._lines(io.BytesIO(data), path, fmt, live=False)
            return
        yield from self._whole(path, data, fmt, st)

    # -- line formats ----------------------------------------------------------------------

    def _lines(self, stream: BinaryIO, origin: str, fmt: str, live: bool) -> Iterator[Item]:
        if fmt == "raw":
            for lineno, raw in numbered_lines(stream, live):
                yield None if raw is None else self._raw_line(origin, lineno, raw)
            return
        finish = self._finish
        for block in line_blocks(stream, live):
            if block is None:
                yield None
                continue
            first, lines = block
            try:  # fast path: every line is an object
                items = [_loads(raw) for raw in lines]
            except orjson.JSONDecodeError:
                items = []
            if items and all(type(r) is dict for r in items):
                if may_hold_long_integer(b"".join(lines)):  # integers beyond 64 bits stay exact
                    items = list(map(exact_numbers, lines, items))
                for offset, record in enumerate(items):
                    if "id" not in record or "text" not in record:
                        finish(record, f"{origin}:{first + offset}")
                yield from items
                continue
            for offset, raw in enumerate(lines):
                if raw.strip():
                    item = parse_or_bad(raw, origin, first + offset)
                    if isinstance(item, BadLine):
                        yield item
                    else:
                        yield finish(item, f"{origin}:{first + offset}")

    def _raw_line(self, origin: str, lineno: int, raw: bytes) -> Record:
        text, warning = decode_text(raw.rstrip(b"\r"))
        record: Record = {"id": self._id(text, f"{origin}:{lineno}"), "text": text}
        if warning:
            add_warning(record, warning)
        return record

    # -- whole-file formats ----------------------------------------------------------------

    def _whole(self, path: str, data: bytes, fmt: str, st: os.stat_result | None) -> Iterator[Item]:
        if fmt == "text":
            if looks_binary(data):
                if path in self._maybe_text or (self.watch and not extension(path)):
                    self.skipped.append((path, "binary"))  # found, not asked for: a skip
                else:
                    yield BadFile(path, 0, _BINARY, data[:64])
                return
            text, warning = decode_text(data)
            meta: Record = {"path": path}
            if st is not None:
                meta["mtime"] = st.st_mtime
            meta["bytes"] = len(data)
            record: Record = {"id": self._id(text, path), "text": text, "metadata": meta}
            if warning:
                add_warning(record, warning)
            yield record
        elif fmt == "json":
            yield from self._json(path, data)
        elif fmt == "csv":
            yield from self._csv(path, data)
        else:  # ndjson from a whole buffer (not reached from read_path; kept for completeness)
            yield from self._lines(io.BytesIO(data), path, "ndjson", live=False)

    def _document(
        self, path: str, data: bytes, fmt: str, st: os.stat_result | None
    ) -> Iterator[Item]:
        """A PDF (one record per page), HTML or DOCX file (one record)."""
        doc = READERS[fmt](data)
        base: Record = {"path": path}
        if st is not None:
            base["mtime"] = st.st_mtime
        base["bytes"] = len(data)
        paged = fmt == "pdf"
        for n, text in enumerate(doc.parts, 1):
            meta = dict(base, page=n) if paged else dict(base)
            meta.update(doc.metadata)
            where = f"{path}:{n}" if paged else path
            record: Record = {"id": self._id(text, where), "text": text, "metadata": meta}
            for warning in doc.warnings:
                if not paged or warning.startswith(f"page {n} "):
                    add_warning(record, warning)
            yield record

    def _json(self, path: str, data: bytes) -> Iterator[Item]:
        if not data.strip():
            return  # an empty file holds no records
        data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM, as csv reads it
        try:
            value = exact_numbers(data, orjson.loads(data))
        except orjson.JSONDecodeError as exc:
            # quote the line at fault, not the start of the file (one line on stderr)
            lineno = max(int(getattr(exc, "lineno", 1) or 1), 1)
            lines = data.split(b"\n")
            line = lines[min(lineno, len(lines)) - 1].rstrip(b"\r")
            yield BadLine(path, lineno, describe_json_error(line, exc), line[:200])
            return
        if isinstance(value, dict):
            yield self._finish(value, path)
            return
        if not isinstance(value, list):
            yield BadLine(path, 1, "expected a JSON object or an array of objects", data[:200])
            return
        for i, element in enumerate(value, 1):
            if isinstance(element, dict):
                yield self._finish(element, f"{path}:{i}")
            else:
                raw = dumps_value(element)[:200]  # a big integer too (orjson refuses it)
                yield BadLine(path, i, f"array element {i} is not a JSON object", raw)

    def _csv(self, path: str, data: bytes) -> Iterator[Item]:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            line = data.count(b"\n", 0, err.start) + 1
            yield BadLine(path, line, f"invalid UTF-8 at byte {err.start}", data[:200])
            return
        # the whole file is in memory: no field can be longer than it (the csv module's
        # default limit, 128 KiB, would refuse a long document in a `text` column)
        if len(text) >= csv.field_size_limit():
            csv.field_size_limit(len(text) + 1)
        rows = csv.reader(io.StringIO(text, newline=""))
        header: list[str] | None = None  # the first non-blank row names the fields
        while True:
            before = rows.line_num
            try:
                row = next(rows)
            except StopIteration:
                return
            except csv.Error as exc:  # a bad row: report it and read on (nothing lost)
                yield BadLine(path, rows.line_num, f"invalid CSV: {exc}", b"")
                if rows.line_num == before:
                    return
                continue
            if not row:
                continue  # blank lines are skipped, before the header too
            if header is None:
                header = row
                continue
            if len(row) > len(header):
                reason = f"row has {len(row)} fields, the header has {len(header)}"
                extra = row[len(header) :]
                yield BadLine(path, rows.line_num, reason, ",".join(extra).encode())
                continue
            record: Record = dict.fromkeys(header)  # a short row: missing fields are null
            record.update(zip(header, row, strict=False))
            yield self._finish(record, f"{path}:{rows.line_num}")

    # -- ids -------------------------------------------------------------------------------

    def _finish(self, record: Record, where: str) -> Record:
        """Apply the `content` alias and give a record without an id its id."""
        if "_error" in record:
            return record  # an error record passes through untouched
        if "text" not in record and isinstance(record.get("content"), str):
            record["text"] = record.pop("content")
        if "id" not in record:
            text = record.get("text")
            record["id"] = self._id(text if isinstance(text, str) else record, where)
        return record

    def _id(self, content: str | Record, where: str) -> str:
        if not self.by_content:
            return where
        data = (
            content.encode("utf-8", "surrogatepass")
            if isinstance(content, str)
            else dumps_value(content, sort_keys=True)
        )
        return hashlib.sha256(data).hexdigest()[:16]

    # -- watch -----------------------------------------------------------------------------

    def _watch(self) -> Iterator[Item]:
        import watchfiles

        roots, wanted = self._watch_roots()
        changes_seen = watchfiles.watch(
            *roots,
            watch_filter=lambda _change, path: wanted(path),
            step=self.watch_step_ms,
            debounce=1000,
            rust_timeout=200,
            yield_on_timeout=True,
            raise_interrupt=True,
        )
        # The watcher starts on the first step; only then list what is already there, so a file
        # created in between is seen by one or the other (and emitted once: see _changed).
        first = next(changes_seen)
        for path in self.expand():
            yield from self._emit_if_changed(path)
        yield None
        batches = [first]
        for changes in changes_seen:
            batches.append(changes)
            for batch in batches:
                for kind, path in sorted(batch):
                    if kind == watchfiles.Change.deleted:
                        self._unsettled.pop(os.path.realpath(path), None)
                        yield from self._deleted(path)
                for path in sorted({p for kind, p in batch if kind != watchfiles.Change.deleted}):
                    yield from self._emit_if_changed(self._shown(path))
            batches = []
            for path in list(self._unsettled.values()):  # files still being written
                yield from self._emit_if_changed(path)
            yield None

    def _shown(self, path: str) -> str:
        """A path reported by the watcher (absolute) as the arguments name it."""
        real = os.path.realpath(path)
        for arg in self.paths:
            if os.path.isdir(arg):
                rel = os.path.relpath(real, os.path.realpath(arg))
                if not rel.startswith(".."):
                    return os.path.normpath(os.path.join(arg, rel))
            elif os.path.exists(arg) and os.path.realpath(arg) == real:
                return arg
        return path if any(os.path.isabs(a) for a in self.paths) else os.path.relpath(path)

    def _deleted(self, path: str) -> Iterator[Item]:
        """A deletion record for a file that was emitted and is gone (not for one that
        was never read, nor for one that is back already)."""
        if os.path.exists(path) or self._seen.pop(os.path.realpath(path), None) is None:
            return
        shown = self._shown(path)
        yield {"id": shown, "deleted": True, "metadata": {"path": shown}}

    def _emit_if_changed(self, path: str) -> Iterator[Item]:
        """The records of `path`, unless its content is what was last emitted for it, or it is
        still being written (see `_still_writing`)."""
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                return
            with open(path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return  # gone again before we could read it
        key = os.path.realpath(path)
        digest = hashlib.sha256(data).digest()
        if self._seen.get(key) == digest:
            self._unsettled.pop(key, None)
            return
        if self._still_writing(path, data, st):
            self._unsettled[key] = path  # looked at again on the watcher's next step
            return
        self._unsettled.pop(key, None)
        self._seen[key] = digest
        yield from self.read_path(path)

    def _still_writing(self, path: str, data: bytes, st: os.stat_result) -> bool:
        """A line file whose last line has no newline yet, or a JSON file that does not parse
        yet, is a file being written, not bad data: it is read once it is complete, or once it
        has not changed for WATCH_SETTLE_SECONDS (then what is wrong with it is an error)."""
        if time.time() - st.st_mtime >= WATCH_SETTLE_SECONDS or not data:
            return False
        fmt = self.format_of(path)
        if inner_name(path)[1]:
            return False
        if fmt in ("raw", "ndjson"):
            return not data.endswith(b"\n")
        if fmt == "json":
            try:
                orjson.loads(data)
            except orjson.JSONDecodeError:
                return True
        return False

    def _watch_roots(self) -> tuple[list[str], Any]:
        """The directories to watch and a predicate for the files that count."""
        roots: list[str] = []
        files: set[str] = set()
        dirs: list[str] = []
        patterns: list[str] = []
        for arg in self.paths:
            if os.path.isdir(arg):
                dirs.append(os.path.realpath(arg))
                roots.append(arg)
            elif glob.has_magic(arg) and not os.path.exists(arg):
                base = _glob_base(arg)
                if not os.path.isdir(base):
                    raise _missing(base)
                patterns.append(os.path.abspath(arg))
                roots.append(base)
            elif os.path.exists(arg):
                files.add(os.path.realpath(arg))
                roots.append(os.path.dirname(os.path.abspath(arg)))
            else:
                raise _missing(arg)

        def wanted(path: str) -> bool:
            real = os.path.realpath(path)
            if real in files:
                return True
            if any(_glob_match(os.path.abspath(path), p) for p in patterns):
                return not _hidden(os.path.basename(path))
            for d in dirs:
                rel = os.path.relpath(real, d)
                if not rel.startswith(".."):
                    parts = rel.split(os.sep)
                    if not any(_hidden(p) for p in parts) and self.listed(path):
                        return True
            return False

        return sorted(set(roots)), wanted


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _glob_match(path: str, pattern: str) -> bool:
    """Whether absolute `path` matches absolute `pattern` as glob.glob would (`*` stays
    within one directory; `**` spans any number)."""
    if "**" in pattern:
        return path in {os.path.abspath(p) for p in glob.glob(pattern, recursive=True)}
    parts, pattern_parts = path.split(os.sep), pattern.split(os.sep)
    return len(parts) == len(pattern_parts) and all(
        fnmatch.fnmatchcase(a, b) for a, b in zip(parts, pattern_parts, strict=True)
    )


def _glob_base(pattern: str) -> str:
    """The longest leading directory of `pattern` without glob characters."""
    parts = pattern.split(os.sep)
    base: list[str] = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        base.append(part)
    return os.sep.join(base) or ("/" if pattern.startswith("/") else ".")


def walk(
    root: str,
    listed: Any = lambda path: extension(path) in EXTENSIONS,
    skipped: list[tuple[str, str]] | None = None,
) -> list[str]:
    """Files under `root` that `listed` accepts, recursively, sorted.

    Skipped, each appended to `skipped` as (path, reason): hidden entries ("hidden"), files
    `listed` refuses ("extension"), symbolic links that lead out of the tree ("outside": a link
    planted in an ingested tree could pull in any file, e.g. `notes.txt -> ~/.ssh/id_rsa`; name
    a linked path to read it) or nowhere ("broken"), and what is not a regular file or a
    directory ("special"). Links that stay inside the tree are followed; a directory reached
    twice (a link loop, or a link to a directory walked already) is walked once.

    A directory that cannot be listed is an error naming it, not a silent gap.
    """
    out: list[str] = []
    skip = skipped if skipped is not None else []
    top = os.path.realpath(root)
    walked: set[str] = set()

    def inside(real: str) -> bool:
        return real == top or real.startswith(top.rstrip(os.sep) + os.sep)

    def visit(directory: str, real_dir: str) -> None:
        if real_dir in walked:
            return  # reached again through a link: its files are read once
        walked.add(real_dir)
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except PermissionError:
            raise _permission_error(directory) from None
        for entry in entries:
            if _hidden(entry.name):
                skip.append((entry.path, "hidden"))
                continue
            real = entry.path
            if entry.is_symlink():
                real = os.path.realpath(entry.path)
                if not inside(real):
                    skip.append((entry.path, "outside"))
                    continue
                if not os.path.exists(real):
                    skip.append((entry.path, "broken"))
                    continue
            if entry.is_dir():
                visit(entry.path, real if entry.is_symlink() else os.path.realpath(entry.path))
            elif not entry.is_file():
                skip.append((entry.path, "special"))
            elif listed(entry.path):
                out.append(entry.path)
            else:
                skip.append((entry.path, "extension"))

    visit(root, top)
    return out


def open_file(path: str) -> BinaryIO:
    try:
        fh = open(path, "rb")  # noqa: SIM115 - the caller closes it
    except FileNotFoundError:
        raise _missing(path) from None
    except PermissionError:
        raise _permission_error(path) from None
    except IsADirectoryError:
        raise OptionError(f"{path}: is a directory") from None
    return fh


def read_all(stream: BinaryIO) -> bytes:
    try:
        return stream.read()
    except IsADirectoryError:
        raise OptionError(f"{getattr(stream, 'name', 'input')}: is a directory") from None


def _is_regular(stream: BinaryIO) -> bool:
    try:
        return stat.S_ISREG(os.fstat(stream.fileno()).st_mode)
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return True  # a stream with no fd (a test harness): read it like a file


_BINARY = (
    "binary content (NUL bytes), not text; give its format a converter with "
    "--convert EXT=COMMAND, or leave it out"
)


def decode_text(data: bytes) -> tuple[str, str | None]:
    """Text from UTF-8 bytes; invalid bytes become U+FFFD and a warning says where."""
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as err:
        warning = f"invalid UTF-8 at byte {err.start}; replaced with U+FFFD"
        return data.decode("utf-8", errors="replace"), warning
