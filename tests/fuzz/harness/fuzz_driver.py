"""The driver (sage_cli/execution/driver.py) under map/filter/flatmap: batching must not change results.

The input picks an error mode (fail/skip/emit), a batch size (1-8), an operator and an
expression from the grammar of tests/fuzz/expressions.py; the rest is the NDJSON stream. The
driver's output is compared with a reference that runs the operator on one record at a time:
- every record's outputs come once, in input order, whatever the batch size and wherever a
  record fails inside a batch (the driver retries a failed batch record by record);
- `_error` records pass through untouched; a bad line or failed record is dropped (skip),
  replaced by an `_error` record naming its line (emit), or ends the run with a DataError /
  SageError naming `stdin:LINE` after everything before it was written (fail).
"""

from __future__ import annotations

import io
import os
import warnings

import orjson

from sage_cli.cli.io import RecordReader, RecordWriter, dump_record
from sage_cli.errors import SageError
from sage_cli.execution.driver import Driver, ErrorMode, ErrorPolicy
from sage_cli.operators.expr import Filter, FlatMap, Map
from sage_cli.operators.ndjson import parse_line
from tests.fuzz.expressions import build
from tests.fuzz.harness.fuzz_expr import Chooser

SEEDS: list[bytes] = [
    b'\x00\x03\x00\x01\x01{"a": 1}\n{"a": "x"}\n{"_error": {"line": 9}}\nnot json\n{"a": [1]}\n',
    b'\x01\x01\x01\x05\x02\x03{"text": "Hi"}\n\n{"text": 3}\n[1]\n{"text": "b"}\n',
    b'\x02\x07\x02\x00{"a": {"a": 2}}\n{"b": null}\n{"a": 0}\n',
]
MAX_LEN = 2048
MODES = [ErrorMode.fail, ErrorMode.skip, ErrorMode.emit]
OPERATORS = [Map, Filter, FlatMap]

warnings.simplefilter("ignore", SyntaxWarning)


def reference(op, mode: ErrorMode, stream: bytes) -> tuple[list[dict], int | None]:
    """What the driver must write, and the line it must stop at (fail), one record at a time."""
    out: list[dict] = []
    text = stream[:-1] if stream.endswith(b"\n") else stream
    for n, raw in enumerate(text.split(b"\n") if stream else [], 1):
        if not raw.strip():
            continue
        parsed = parse_line(raw)
        if isinstance(parsed, dict) and "_error" in parsed:
            out.append(parsed)
            continue
        if isinstance(parsed, dict):
            try:
                out.extend(op.process([dict(parsed)]))
                continue
            except Exception as exc:  # noqa: BLE001 - the reference judges every failure alike
                error = str(exc) or type(exc).__name__
                raw_value: object = parsed
        else:
            error, raw_value = parsed, raw.decode("utf-8", errors="replace")
        if mode is ErrorMode.fail:
            return out, n
        if mode is ErrorMode.emit:
            entry = {"stage": "sage fuzz", "origin": "stdin", "line": n, "error": error}
            if isinstance(raw_value, dict):
                out.append(dict(raw_value, _error=entry))
            else:
                out.append({"_error": dict(entry, raw=raw_value)})
    return out, None


def TestOneInput(data: bytes) -> None:
    if len(data) < 3:
        return
    mode = MODES[data[0] % 3]
    batch_size = data[1] % 8 + 1
    kind = OPERATORS[data[2] % 3]
    choose = Chooser(data[3:40])
    expr = build(choose, depth=2)
    stream = data[3 + choose.pos :]

    want, stop = reference(kind(expr), mode, stream)
    want = [orjson.loads(dump_record(r)) for r in want]  # as written: int keys become strings
    fd = os.memfd_create("fuzz-driver")
    try:
        writer = RecordWriter(fd=fd)
        driver = Driver(kind(expr), writer, ErrorPolicy("sage fuzz", mode), batch_size)
        try:
            driver.run_reader(stream_reader(stream))
        except SageError as exc:
            writer.flush()
            assert mode is ErrorMode.fail and stop is not None, (exc, stop)
            assert str(exc).startswith(f"stdin:{stop}: "), (str(exc), stop)
        else:
            assert stop is None, ("the run went past the first failure", stop)
        os.lseek(fd, 0, os.SEEK_SET)
        got = [orjson.loads(line) for line in _read_all(fd).splitlines()]
    finally:
        os.close(fd)
    assert got == want, (expr, batch_size, mode, got, want)


def _read_all(fd: int) -> bytes:
    parts = []
    while chunk := os.read(fd, 1 << 16):
        parts.append(chunk)
    return b"".join(parts)


def stream_reader(stream: bytes) -> RecordReader:
    """A RecordReader over bytes in memory (it opens paths; this reads a stream instead)."""
    reader = RecordReader(["-"])
    reader.blocks = lambda: reader._blocks_of(io.BytesIO(stream), "stdin")  # type: ignore[method-assign]
    return reader
