"""`sage source`'s per-format readers (operators/source.py): any bytes as a .txt, .ndjson,
.json or .csv file (or read line by line with -R) give records and BadLines, never another
exception; a record has an id (unless it is an `_error` record), a BadLine a line >= 1 and a
one-line message, and an NDJSON or raw file accounts for every non-blank line.

The first input byte picks the format; the rest is the file.
"""

from __future__ import annotations

import os
import tempfile

from sage_cli.operators.ndjson import BadLine
from sage_cli.operators.source import Source

FORMATS = [(".txt", {}), (".ndjson", {}), (".json", {}), (".csv", {}), (".txt", {"raw": True})]
_DIR: list[str] = []


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    suffix, options = FORMATS[data[0] % len(FORMATS)]
    body = data[1:]
    if not _DIR:
        _DIR.append(tempfile.mkdtemp(prefix="fuzz-source-"))
    path = os.path.join(_DIR[0], "input" + suffix)
    with open(path, "wb") as fh:
        fh.write(body)
    items = [i for i in Source([path], **options).records() if i is not None]  # type: ignore[arg-type]
    for item in items:
        if isinstance(item, BadLine):
            assert item.line >= 1 and "\n" not in item.message(), item
        else:
            assert isinstance(item, dict) and ("id" in item or "_error" in item), item
    if suffix == ".ndjson" or options:
        assert len(items) == sum(1 for line in body.split(b"\n") if line.strip())


SEEDS: list[bytes] = [
    b"\x00# title\n\nsome text \xff\n",
    b'\x01{"id": "a", "text": "x"}\n\n{"content": "y"}\n[1]\n{bad\n',
    b'\x02[\n  {"id": "a"},\n  {"text": "b"},\n  3\n]\n',
    b'\x02\xef\xbb\xbf{"id": "a"}',
    b'\x03\n\nid,text\na,"multi\nline"\nb\nc,d,e\n',
    b"\x04line one\r\n\n  \nline two\xff\n",
]
MAX_LEN = 4096
