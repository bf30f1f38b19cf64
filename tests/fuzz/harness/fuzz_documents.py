"""The document loaders of operators/documents.py (read_pdf, read_html, read_docx, gunzip,
looks_binary) on any bytes: a Document or a DocumentError, never another exception.

A Document has `parts`, a list of str (one for HTML and DOCX, one per page for a PDF; a PDF
page's text has no NUL and no carriage return: line ends are \\n), `metadata` a dict (`pages` an
int for a PDF, `title` a non-empty stripped str when present) and `warnings` one-line strs. A
DocumentError's message is one non-empty line (the source prints it after `PATH: `).

The first input byte picks the mode:
0 read_pdf on the bytes; 1 read_pdf on a valid PDF with the bytes spliced in (next two bytes:
the offset, one byte: how many bytes to delete there); 2 read_html; 3 read_docx on the bytes;
4 read_docx on a valid DOCX whose word/document.xml is the bytes (the XML parser, not only the
zip reader); 5 gunzip with a 1 MiB limit (the content or the limit's DocumentError); 6
looks_binary (a NUL in the first 8 KiB).
"""

from __future__ import annotations

import gzip
import io
import tempfile
import zipfile
from pathlib import Path

from sage_cli.operators.documents import (
    SNIFF_BYTES,
    Document,
    DocumentError,
    gunzip,
    looks_binary,
    read_docx,
    read_html,
    read_pdf,
)

GUNZIP_LIMIT = 1024 * 1024
MAX_LEN = 8192


def _real_files() -> tuple[bytes, bytes]:
    """A small real PDF (two pages, a title) and DOCX (title, heading, paragraph)."""
    from tests.fixtures.documents import make_docx, make_pdf

    with tempfile.TemporaryDirectory(prefix="fuzz-documents-") as tmp:
        pdf = make_pdf(Path(tmp) / "a.pdf", [["Hello page one", "second line"], ["Page two"]], "T")
        docx = make_docx(
            Path(tmp) / "a.docx", [("title", "Doc"), ("h1", "Head"), ("p", "Some text.")]
        )
        return pdf.read_bytes(), docx.read_bytes()


PDF, DOCX = _real_files()
with zipfile.ZipFile(io.BytesIO(DOCX)) as _zip:
    DOCX_PARTS = {info.filename: _zip.read(info) for info in _zip.infolist()}
    DOCUMENT_XML = DOCX_PARTS["word/document.xml"]


def docx_with(document_xml: bytes) -> bytes:
    """The real DOCX with its word/document.xml replaced."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in DOCX_PARTS.items():
            z.writestr(name, document_xml if name == "word/document.xml" else data)
    return out.getvalue()


def splice(data: bytes) -> bytes:
    """The real PDF with data[3:] put at offset data[0:2] in place of data[2] bytes."""
    head = data[:3].ljust(3, b"\x00")
    at = int.from_bytes(head[:2], "big") % (len(PDF) + 1)
    return PDF[:at] + data[3:] + PDF[at + head[2] :]


def check_error(exc: DocumentError) -> None:
    message = str(exc)
    assert message.strip() and "\n" not in message and "\r" not in message, repr(message)


def check_document(doc: Document, pdf: bool = False) -> None:
    assert isinstance(doc, Document)
    assert isinstance(doc.parts, list) and all(isinstance(p, str) for p in doc.parts), doc
    if pdf:
        assert doc.metadata["pages"] == len(doc.parts)
        for part in doc.parts:
            assert "\x00" not in part and "\r" not in part and part == part.strip(), repr(part)
    else:
        assert len(doc.parts) == 1, doc
    title = doc.metadata.get("title")
    if title is not None:
        assert isinstance(title, str) and title and title == title.strip(), repr(title)
    for warning in doc.warnings:
        assert isinstance(warning, str) and "\n" not in warning, repr(warning)


def _read(mode: int, body: bytes) -> None:
    if mode in (0, 1):
        check_document(read_pdf(body if mode == 0 else splice(body)), pdf=True)
    elif mode == 2:
        check_document(read_html(body))
    elif mode in (3, 4):
        check_document(read_docx(body if mode == 3 else docx_with(body)))


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0] % 7, data[1:]
    if mode == 5:
        try:
            out = gunzip(body, GUNZIP_LIMIT)
        except DocumentError as exc:
            check_error(exc)
            return
        assert len(out) <= GUNZIP_LIMIT
        return
    if mode == 6:
        assert looks_binary(body) == (b"\x00" in body[:SNIFF_BYTES])
        return
    try:
        _read(mode, body)
    except DocumentError as exc:
        check_error(exc)


SEEDS: list[bytes] = [
    b"\x00" + PDF,
    b"\x00%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\ntrailer << /Root 1 0 R >>\n",
    b"\x01\x00\x40\x04(\x00\r\n)",
    b"\x01\x01\x00\x00 /Title (x\ny) ",
    b"\x02<html><head><title> T </title><script>x()</script></head><body><nav>menu</nav>"
    b"<article><h1>Head</h1><p>Some text.</p></article><footer>f</footer></body></html>",
    b"\x02<p>only<br>text\x00</p>",
    b"\x03" + DOCX,
    b"\x03PK\x03\x04not a docx",
    b"\x04" + DOCUMENT_XML,
    b'\x04<?xml version="1.0"?><w:document xmlns:w="http://schemas.openxmlformats.org/'
    b'wordprocessingml/2006/main"><w:body><w:p><w:r><w:t>a</w:t></w:r></w:p></w:body>'
    b"</w:document>",
    b"\x04<not xml",
    b"\x05" + gzip.compress(b"hello\n") + gzip.compress(b"again\n"),
    b"\x05" + gzip.compress(b"x" * 2_000_000),
    b"\x05\x1f\x8b\x08\x00truncated",
    b"\x06text\x00binary",
]
