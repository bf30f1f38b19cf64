"""Text out of document files: PDF, HTML, DOCX, gzip, and any format through a converter.

Each reader takes the file's bytes and returns plain text (markdown headings where the format
has headings, so `sage chunk` puts them in `metadata.heading`) and metadata. A file a reader
cannot make sense of raises DocumentError (one file's error: the source reports it under the
error policy and reads on). The libraries are imported only when a file of their kind is read:

- PDF: pypdfium2 (PDFium's own text extraction, in C; Apache-2.0/BSD).
- HTML: trafilatura (main-content extraction: navigation, scripts, styles, sidebars and footers
  are left out; headings come out as markdown). Its import (lxml, justext) is the heaviest,
  paid only by a source that reads an HTML file.
(Import times and speeds: `make bench`, area `documents`; the choice: docs/dataflow.md.)
- DOCX: python-docx (paragraphs in order; Title and Heading N styles become `#` headings).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import zlib
from dataclasses import dataclass, field
from typing import Any

from .base import OptionError

#: bytes a gzip file may inflate to (a "zip bomb" is one file's error, not an out-of-memory)
GUNZIP_LIMIT = 512 * 1024 * 1024
#: how much of a file is looked at to tell text from binary (as git and grep do: a NUL byte)
SNIFF_BYTES = 8192
#: the seconds a --convert program may take for one file
CONVERT_TIMEOUT = 300.0


class DocumentError(Exception):
    """A file that cannot be read as the document its name says it is (one file's error).

    Its message is one line: a library's own message (lxml's ends in a newline) has its
    whitespace runs folded to one space."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


@dataclass
class Document:
    """What a reader found: the text of each part (one for most formats, one per PDF page)."""

    parts: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def looks_binary(data: bytes) -> bool:
    """Whether `data` is binary rather than text: a NUL byte in its first 8 KiB."""
    return b"\x00" in data[:SNIFF_BYTES]


def gunzip(data: bytes, limit: int = GUNZIP_LIMIT) -> bytes:
    """The content of a gzip file (several members are concatenated, as gzip -d does)."""
    out: list[bytes] = []
    size = 0
    while data:
        inflater = zlib.decompressobj(wbits=31)
        try:
            while True:
                chunk = inflater.decompress(data, limit + 1 - size)
                size += len(chunk)
                out.append(chunk)
                if size > limit:
                    raise DocumentError(
                        f"gzip content is larger than {limit // (1024 * 1024)} MiB; "
                        "decompress it first"
                    )
                data = inflater.unconsumed_tail
                if inflater.eof or not data:
                    break
        except zlib.error as exc:
            raise DocumentError(f"not a valid gzip file ({exc})") from None
        if not inflater.eof:
            raise DocumentError("gzip file is truncated")
        data = inflater.unused_data.lstrip(b"\x00")  # padding after a member
    return b"".join(out)


# -- PDF ---------------------------------------------------------------------------------------


def read_pdf(data: bytes) -> Document:
    """One part per page (PDFium's text, line ends as \\n); metadata `pages` and `title`."""
    import pypdfium2 as pdfium

    if not data.strip():
        raise DocumentError("empty file, not a PDF")
    try:
        pdf = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        raise DocumentError(f"not a readable PDF ({exc})") from None
    try:
        pages: list[str] = []
        empty: list[int] = []
        for i in range(len(pdf)):
            try:
                page = pdf[i]
            except pdfium.PdfiumError as exc:
                raise DocumentError(f"page {i + 1} cannot be read ({exc})") from None
            try:
                textpage = page.get_textpage()
                text = textpage.get_text_bounded().replace("\r\n", "\n").replace("\r", "\n")
                textpage.close()
            except pdfium.PdfiumError as exc:
                raise DocumentError(f"page {i + 1} cannot be read ({exc})") from None
            finally:
                page.close()
            text = text.replace("\x00", "").strip()
            if not text:
                empty.append(i + 1)
            pages.append(text)
        try:
            info = pdf.get_metadata_dict(skip_empty=True)
        except pdfium.PdfiumError:
            info = {}
    finally:
        pdf.close()
    meta: dict[str, Any] = {"pages": len(pages)}
    title = str(info.get("Title") or "").strip()
    if title:
        meta["title"] = title
    warnings = [
        f"page {n} has no text layer (a scanned image? OCR it first, e.g. with --convert)"
        for n in empty
    ]
    return Document(pages, meta, warnings)


# -- HTML --------------------------------------------------------------------------------------


def read_html(data: bytes) -> Document:
    """The page's main text (markdown headings), without navigation, scripts, styles, sidebars
    and footers; metadata `title`. A page with no main content falls back to all its text."""
    import trafilatura
    from trafilatura.utils import load_html

    try:
        tree = load_html(data)
        if tree is None:
            raise DocumentError("not readable HTML")
        title = _html_title(tree)  # before extract, which prunes the tree
        text = trafilatura.extract(
            tree,
            output_format="markdown",
            include_comments=False,
            include_tables=True,
            include_images=False,
            include_links=False,
            deduplicate=False,
        )
        warnings: list[str] = []
        if not text:
            text = trafilatura.html2txt(data)
            if text:
                warnings.append("no main content found; all the page's text was kept")
    except (ValueError, TypeError) as exc:  # lxml refuses what is not markup at all
        raise DocumentError(f"not readable HTML ({exc})") from None
    return Document([text or ""], {"title": title} if title else {}, warnings)


def _html_title(tree: Any) -> str:
    """The title as trafilatura's metadata step finds it (OpenGraph and meta tags, JSON-LD,
    then the one <h1> or <title>), without the rest of that step: its date search (htmldate,
    dateparser) costs more than the text extraction itself."""
    from trafilatura.metadata import examine_meta, extract_meta_json, extract_title

    meta = examine_meta(tree)
    try:
        meta = extract_meta_json(tree, meta)
    except Exception:  # noqa: BLE001 - trafilatura guards this call the same way (bad JSON-LD)
        pass
    return (meta.title or extract_title(tree) or "").strip()


# -- DOCX --------------------------------------------------------------------------------------


def _heading_level(style_name: str) -> int | None:
    name = style_name.strip().lower()
    if name == "title":
        return 1
    if name.startswith("heading"):
        rest = name.removeprefix("heading").strip()
        if rest.isdigit() and 1 <= int(rest) <= 6:
            return int(rest)
    return None


def read_docx(data: bytes) -> Document:
    """Paragraphs and tables in document order; Title and Heading 1-6 paragraphs become
    markdown headings (`#` ... `######`); metadata `title` (the core property, else the first
    Title paragraph)."""
    import io
    import zipfile

    import docx
    from docx.document import Document as DocxDocument
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    try:
        document: DocxDocument = docx.Document(io.BytesIO(data))
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise DocumentError(f"not a readable DOCX file ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - python-docx raises its own PackageNotFoundError...
        raise DocumentError(f"not a readable DOCX file ({type(exc).__name__}: {exc})") from None
    try:
        lines, title = _docx_blocks(document, Paragraph, Table)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - a package whose XML is not WordprocessingML
        # (another namespace, a missing <w:body>) fails inside python-docx's element classes
        raise DocumentError(f"not a readable DOCX file ({type(exc).__name__}: {exc})") from None
    return Document(["\n\n".join(lines)], {"title": title} if title else {})


def _docx_blocks(document: Any, paragraph: type[Any], table: type[Any]) -> tuple[list[str], str]:
    """(the lines of the document's paragraphs and tables, its title)."""
    lines: list[str] = []
    first_title = ""
    # style names by id, looked up once (python-docx's `paragraph.style` searches every time)
    names = {s.style_id: s.name or "" for s in document.styles}
    for block in document.iter_inner_content():
        if isinstance(block, paragraph):
            text = block.text.strip()
            if not text:
                continue
            style = names.get(block._p.style or "", "")  # noqa: SLF001 - the pStyle id
            level = _heading_level(style)
            if level is not None:
                if style.strip().lower() == "title" and not first_title:
                    first_title = text
                lines.append(f"{'#' * level} {' '.join(text.split())}")
            else:
                lines.append(text)
        elif isinstance(block, table):
            for row in block.rows:
                cells = [" ".join(c.text.split()) for c in row.cells]
                lines.append(" | ".join(cells))
    return lines, (document.core_properties.title or "").strip() or first_title


# -- converters --------------------------------------------------------------------------------


def parse_converters(specs: list[str]) -> dict[str, list[str]]:
    """`EXT=COMMAND` options as {".ext": argv}; the command is split with shlex (no shell)."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        ext, sep, command = spec.partition("=")
        ext = ext.strip().lower().lstrip(".")
        if not sep or not ext or "/" in ext or not command.strip():
            raise OptionError(
                f"--convert {spec!r}: expected EXT=COMMAND, e.g. --convert doc='antiword -'"
            )
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise OptionError(f"--convert {spec!r}: {exc}") from None
        if shutil.which(argv[0]) is None:
            raise OptionError(
                f"--convert {spec!r}: program {argv[0]!r} not found; install it or give its path"
            )
        out[f".{ext}"] = argv
    return out


def run_converter(
    argv: list[str], path: str, data: bytes | None = None, timeout: float = CONVERT_TIMEOUT
) -> bytes:
    """What `argv` writes on stdout when the file at `path` (or `data`, the content of a
    compressed one) is its stdin. No shell."""
    env = {**os.environ, "LC_ALL": os.environ.get("LC_ALL", "C.UTF-8")}
    try:
        if data is not None:
            done = subprocess.run(
                argv, input=data, capture_output=True, timeout=timeout, check=False, env=env
            )
        else:
            with open(path, "rb") as stdin:
                done = subprocess.run(
                    argv, stdin=stdin, capture_output=True, timeout=timeout, check=False, env=env
                )
    except subprocess.TimeoutExpired:
        raise DocumentError(f"converter {argv[0]} took more than {timeout:g}s") from None
    except OSError as exc:
        raise DocumentError(f"converter {argv[0]} could not run ({exc.strerror or exc})") from None
    if done.returncode != 0:
        lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
        why = f": {lines[-1][:200]}" if lines else ""
        raise DocumentError(f"converter {argv[0]} exited with status {done.returncode}{why}")
    return done.stdout


#: extension -> reader of the file's bytes
READERS = {"pdf": read_pdf, "html": read_html, "docx": read_docx}
