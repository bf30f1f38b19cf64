"""`sage source`'s per-format readers (operators/source.py, operators/documents.py): any bytes
as a .txt, .ndjson, .json, .csv, .pdf, .html, .docx or .txt.gz file (or read line by line with
-R) give records and BadLines, never another exception; a record has an id (unless it is an
`_error` record), a BadLine a line >= 1 (0 for a whole file refused: binary, corrupt) and a
one-line message, and an NDJSON or raw file accounts for every non-blank line.

The first input byte picks the format; the rest is the file.
"""

from __future__ import annotations

import os
import tempfile

from sage_cli.operators.ndjson import BadLine
from sage_cli.operators.source import BadFile, Source

FORMATS = [
    (".txt", {}),
    (".ndjson", {}),
    (".json", {}),
    (".csv", {}),
    (".txt", {"raw": True}),
    (".pdf", {}),
    (".html", {}),
    (".docx", {}),
    (".txt.gz", {}),
]
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
            whole_file = isinstance(item, BadFile) and item.line == 0
            assert (item.line >= 1 or whole_file) and "\n" not in item.message(), item
        else:
            assert isinstance(item, dict) and ("id" in item or "_error" in item), item
    if suffix == ".ndjson" or options:
        assert len(items) == sum(1 for line in body.split(b"\n") if line.strip())


SEEDS: list[bytes] = [
    b"\x00# title\n\nsome text \xff\n",
    b'\x01{"id": "a", "text": "x"}\n\n{"content": "y"}\n[1]\n{bad\n',
    b'\x02[\n  {"id": "a"},\n  {"text": "b"},\n  3\n]\n',
    b'\x02\xef\xbb\xbf{"id": "a"}',
    b"\x02[{}, 33333333333333333333333333333333331]",  # found by make fuzz: orjson.dumps failed
    b'\x03\n\nid,text\na,"multi\nline"\nb\nc,d,e\n',
    b"\x04line one\r\n\n  \nline two\xff\n",
    b"\x05%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\ntrailer << /Root 1 0 R >>\n",
    b"\x06<html><head><title>T</title><script>x()</script></head><body><nav>menu</nav>"
    b"<article><h1>Head</h1><p>Some text.</p></article><footer>f</footer></body></html>",
    b"\x07PK\x03\x04not a docx",
    b"\x08\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\x03\xcbH\xcd\xc9\xc9WH\xaf\xe2\x02\x00\x18\x9aTi\t\x00\x00\x00",
]
MAX_LEN = 4096
