"""The NDJSON reader: any bytes, cut into any chunks, give records or BadLines, never an
exception, and every line is accounted for with its number.

The first input byte picks the chunk size the bytes arrive in (a pipe delivers lines in pieces);
the rest is the stream. Checked on every input:
- `complete_lines` gives back exactly the stream (less one final `\\n`), whatever the chunking;
- `RecordReader` numbers every non-blank line once, in order; a record is what orjson makes of
  that line (integers beyond 64 bits kept exact), a BadLine carries that line's raw bytes and a one-line reason naming `stdin:LINE`;
- `loads_record` on each line is the same record or a DataError with the same reason;
- a block marked clean holds only records, none of them an `_error` record;
- `numbered_lines` (the line reader of sources and merge) numbers the same lines the same.
"""

from __future__ import annotations

import io

import orjson

from sage_cli.cli.io import RecordReader, loads_record
from sage_cli.errors import DataError
from sage_cli.operators.ndjson import (
    BadLine,
    complete_lines,
    dumps_value,
    exact_numbers,
    numbered_lines,
    parse_line,
    printable,
)
from tests.fuzz.seeds import jsontestsuite_seeds

SEEDS: list[bytes] = [
    b'\x05{"id": 1, "text": "hello"}\n{"id": 2}\n',
    b'\x05{"a": [1, 2.5, null, true]}\n\n  \n{"_error": {"line": 1}}\n',
    b'\x05{"a": "\\u00e9\\ud83d\\ude00"}\r\n{"b": 1}',
    b'\x05[1]\n"s"\n3\nnull\n{"x":\n',
    b"\x05\xff\xfe{}\n{}\n",
    b'\x40{"_erro\\u0072": {"line": 1}}\n{"a": 1}\n',
    b'\x05{"a": [1]}\n{"n": 3333333333333333333333333333331, "m": -18446744073709551617}\n',
    *(b"\x05" + seed for seed in jsontestsuite_seeds()),
]
MAX_LEN = 4096


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


class Chunks(io.RawIOBase):
    """A binary stream that returns at most `size` bytes per read, like a pipe."""

    def __init__(self, data: bytes, size: int) -> None:
        self.parts = chunked(data, size)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        return self.parts.pop(0) if self.parts else b""


def check(data: bytes, size: int) -> None:
    expected = data[:-1] if data.endswith(b"\n") else data
    heads = list(complete_lines(chunked(data, size)))
    assert b"\n".join(heads) == expected, (heads, data)

    lines = expected.split(b"\n") if data else []
    reader = RecordReader(["-"])
    seen: list[int] = []
    for block in reader._blocks_of(Chunks(data, size), "stdin"):
        numbers = block.lines or list(range(block.first_line, block.first_line + len(block.items)))
        if block.clean:  # the driver runs a clean block with no per-record checks
            assert block.lines is None
            assert all(type(item) is dict and "_error" not in item for item in block.items)
        assert len(numbers) == len(block.items)
        for line, item in zip(numbers, block.items, strict=True):
            raw = lines[line - 1]
            seen.append(line)
            if isinstance(item, BadLine):
                assert item.raw == raw and item.line == line and item.origin == "stdin"
                message = item.message()
                assert message.startswith(f"stdin:{line}: ")
                assert printable(message) == message, message  # one line, no control chars
                assert isinstance(parse_line(raw), str)
                item.raw_text()  # always decodable for an error record
                try:
                    loads_record(raw, "stdin", line)
                except DataError as exc:
                    assert str(exc) == message
                else:
                    raise AssertionError(f"loads_record accepted a bad line: {raw!r}")
            else:
                assert type(item) is dict
                # orjson's reading, with integers beyond 64 bits kept exact (issue 17)
                assert item == exact_numbers(raw, orjson.loads(raw))
                assert loads_record(raw, "stdin", line) == item
                dumps_value(item)  # what was read can be written
    wanted = [n for n, raw in enumerate(lines, 1) if raw.strip()]
    assert seen == wanted, (seen, wanted)

    # the line reader of sources and merge: the same non-blank lines, numbered the same
    numbered = [(n, raw) for n, raw in numbered_lines(Chunks(data, size), live=True)]
    assert [(n, raw) for n, raw in numbered if raw is not None] == [
        (n, lines[n - 1]) for n in wanted
    ]


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    size = data[0] % 64 + 1
    check(data[1:], size)
