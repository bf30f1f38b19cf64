"""Parsing one NDJSON line, shared by the NDJSON reader in sage_cli.cli.io and by the operators
that read files themselves (source, merge).

A line that is not a JSON object becomes a BadLine: where it was, why, and its raw bytes. The
driver applies the error policy to it (`--on-error`, `--errors FILE`) with `FILE:LINE`.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import orjson

from .base import RecordError, terminal_safe

Record = dict[str, Any]

#: bytes asked for per read when reading lines from a file or pipe
CHUNK = 1024 * 1024
#: longest excerpt of a bad line quoted in an error message
QUOTE_LIMIT = 80
#: longest line read: past it the input is not NDJSON (`/dev/zero`, a binary file with no
#: newline), and holding more would only grow memory until the process is killed
MAX_LINE_BYTES = 256 * 1024 * 1024


class LineTooLong(RecordError):
    """A line longer than MAX_LINE_BYTES (a data error, exit 65)."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"line longer than {limit // (1024 * 1024) or limit} "
            f"{'MiB' if limit >= 1024 * 1024 else 'bytes'} with no newline; is this NDJSON?"
        )


@dataclass
class BadLine:
    """A line that is not a JSON object: where it was, why, and its raw bytes."""

    origin: str
    line: int
    reason: str
    raw: bytes

    def message(self) -> str:
        return f"{self.origin}:{self.line}: {self.reason}"

    def raw_text(self) -> str:
        return self.raw.decode("utf-8", errors="replace")


def printable(text: str) -> str:
    """`text` on one line with control characters escaped (`\\r` -> `\\x0d`, `\\n` -> `\\x0a`):
    an excerpt of input data quoted in an error message can neither break the line nor drive
    the terminal."""
    return terminal_safe(text).replace("\n", "\\x0a")


def describe_json_error(raw: bytes, exc: Exception) -> str:
    """A short reason for a line orjson rejected, with an excerpt of the line."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return f"invalid UTF-8 at byte {err.start}"
    reason = str(exc).split(":", 1)[0] if str(exc) else "invalid JSON"
    excerpt = printable(raw[:QUOTE_LIMIT].decode("utf-8", errors="replace"))
    if len(raw) > QUOTE_LIMIT:
        excerpt += "..."
    return f"invalid JSON ({reason}): {excerpt}"


#: every byte to b" " but digits to b"0": a run of 19 zeros then marks where an integer beyond
#: 64 bits may be (2**63 has 19 digits). One translate and one search per block cost about a
#: tenth of orjson's parse; a regex (`\d{19}`) cost as much as the parse itself.
_DIGITS_AS_ZERO = bytes(48 if 48 <= b <= 57 else 32 for b in range(256))
_LONG_RUN = b"0" * 19


def may_hold_long_integer(data: bytes) -> bool:
    """Whether `data` has 19 digits in a row, the only place an integer orjson cannot hold
    exactly could be (it reads integers beyond 64 bits as floats)."""
    return _LONG_RUN in data.translate(_DIGITS_AS_ZERO)


def exact_numbers(raw: bytes, value: Any) -> Any:
    """`value`, orjson's reading of the JSON text `raw`, with every integer exact: re-read by the
    standard library (which keeps big integers as int) when `raw` may hold one beyond 64 bits.
    Writing goes back through the standard library too (`dumps_value`), so such a
    number passes through sage digit for digit."""
    if not may_hold_long_integer(raw):
        return value
    import json

    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # > 4300 digits, or deeper than the stdlib reads
        return value


def parse_line(raw: bytes) -> Record | str:
    """Parse one NDJSON line: the record, or a string saying why it is not one."""
    try:
        value = exact_numbers(raw, orjson.loads(raw))
    except orjson.JSONDecodeError as exc:
        return describe_json_error(raw, exc)
    if type(value) is not dict:
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
            type(value), "a number"
        )
        return f"expected a JSON object, got {kind}"
    return value


def parse_or_bad(raw: bytes, origin: str, line: int) -> Record | BadLine:
    """The record on `raw`, or a BadLine naming `origin:line`."""
    parsed = parse_line(raw)
    return parsed if type(parsed) is dict else BadLine(origin, line, str(parsed), raw)


def complete_lines(chunks: Iterable[bytes], max_line: int | None = None) -> Iterator[bytes]:
    """Runs of complete lines (joined, without the final `\\n`) from raw chunks, in order.

    A line split across chunks (a 50 MB line comes in many parts) is joined before it is
    yielded; a final line without `\\n` comes last. The one place sage splits bytes into lines.
    A line that grows past `max_line` bytes (MAX_LINE_BYTES) raises LineTooLong: memory stays
    bounded whatever the input (`sage map r < /dev/zero` used to grow until it was killed).
    """
    limit = MAX_LINE_BYTES if max_line is None else max_line
    pending: list[bytes] = []  # the start of a line not yet ended
    held = 0  # bytes in pending
    for chunk in chunks:
        nl = chunk.rfind(b"\n")
        if nl < 0:
            pending.append(chunk)
            held += len(chunk)
            if held > limit:
                raise LineTooLong(limit)
            continue
        if pending:
            pending.append(chunk[:nl])
            head = b"".join(pending)
            pending = []
        else:
            head = chunk[:nl]
        rest = chunk[nl + 1 :]
        held = len(rest)
        if rest:
            pending.append(rest)
        yield head
    if pending:
        yield b"".join(pending)


def line_blocks(stream: BinaryIO, live: bool = False) -> Iterator[tuple[int, list[bytes]] | None]:
    """(number of the first line, lines without `\\n`) for each run of complete lines read
    from `stream`, blank lines included. A final line without `\\n` comes last.

    With `live` (a pipe or terminal), None follows each run: the caller should flush what it
    has before the next read, which may block.
    """
    read = getattr(stream, "read1", stream.read)
    lineno = 0
    for head in complete_lines(iter(lambda: read(CHUNK), b"")):
        lines = head.split(b"\n")
        yield lineno + 1, lines
        lineno += len(lines)
        if live:
            yield None


def numbered_lines(stream: BinaryIO, live: bool = False) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line) for every non-blank line of `stream`; with `live`, `(n, None)`
    after each read (see line_blocks)."""
    lineno = 0
    for block in line_blocks(stream, live):
        if block is None:
            yield lineno, None
            continue
        first, lines = block
        for offset, raw in enumerate(lines):
            if raw.strip():
                yield first + offset, raw
        lineno = first + len(lines) - 1


# -- writing ---------------------------------------------------------------------------------


def dumps_value(value: Any, *, sort_keys: bool = False, newline: bool = False) -> bytes:
    """JSON bytes for `value`, compact; whatever JSON can hold is written, never a crash.

    orjson first; what it refuses goes through the standard library instead (found by fuzzing):
    values nested deeper than orjson writes (255 to 1024 levels: orjson reads them), integers
    beyond 64 bits (written exactly), non-string keys (as strings), lone surrogates (as U+FFFD).
    Every operator that serialises a record or a key uses this, so what one stage can write,
    the next can read and write again.
    """
    option = orjson.OPT_SERIALIZE_NUMPY
    if sort_keys:
        option |= orjson.OPT_SORT_KEYS
    if newline:
        option |= orjson.OPT_APPEND_NEWLINE
    try:
        return orjson.dumps(value, option=option, default=str)
    except TypeError:
        pass
    import json

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 4 * _MAX_DEPTH))
    try:
        text = json.dumps(
            _jsonable(value),
            ensure_ascii=False,
            separators=(",", ":"),
            sort_keys=sort_keys,
            default=str,
        )
    finally:
        sys.setrecursionlimit(limit)
    return text.encode("utf-8") + (b"\n" if newline else b"")


def dump_record(record: Record) -> bytes:
    """One NDJSON line for `record` (see `dumps_value`)."""
    return dumps_value(record, newline=True)


def _jsonable(value: Any, depth: int = 0) -> Any:
    """`value` as the standard library's json can write it as valid JSON: keys as strings, lone
    surrogates as U+FFFD, NaN and infinities as null, and past _MAX_DEPTH (only a record that
    holds itself gets there: input is at most 1024 deep) `"..."`."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, int) and value.bit_length() > 14_000:  # past str()'s 4300 digits
        return None
    if not isinstance(value, dict | list | tuple):
        return value
    if depth >= _MAX_DEPTH:
        return "..."
    if isinstance(value, dict):
        return {
            _jsonable(k if isinstance(k, str) else str(k)): _jsonable(v, depth + 1)
            for k, v in value.items()
        }
    return [_jsonable(v, depth + 1) for v in value]


#: deeper than any record orjson reads (1024), so only a cycle is cut
_MAX_DEPTH = 1100
_SURROGATE = re.compile("[\ud800-\udfff]")
