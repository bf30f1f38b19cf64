"""`sage source` end to end on damaged documents (PDF, HTML, DOCX, gzip): real files made by the
libraries sage reads them with (tests/fuzz/harness/fuzz_documents.py), then edited at random,
read by a real `sage source` process. Under the default error policy it exits 0 with one record
per page (PDF) or file, or 65 with one line `sage source: error: PATH: ...` on stderr; under
--on-error emit it exits 0 with an `_error` record naming the file instead. Never a traceback.

(The loaders themselves, in process and much faster: the atheris harness.)
"""

from __future__ import annotations

import gzip
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from sage_cli.operators.documents import (
    Document,
    DocumentError,
    gunzip,
    read_docx,
    read_html,
    read_pdf,
)
from tests.conftest import parse_ndjson, run_sage
from tests.fuzz.conftest import examples
from tests.fuzz.harness.fuzz_documents import DOCUMENT_XML, DOCX, PDF, docx_with
from tests.fuzz.strategies import mutated

HTML = (
    b"<html><head><title>T</title><script>x()</script></head><body><nav>menu</nav>"
    b"<article><h1>Head</h1><p>Some text, long enough to be the main content.</p></article>"
    b"<footer>f</footer></body></html>"
)
xml_text = st.text(st.sampled_from('<>/="w: abp\x00&;'), max_size=40).map(str.encode)
documents = st.one_of(
    st.tuples(st.just(".pdf"), mutated(st.just(PDF))),
    st.tuples(st.just(".html"), mutated(st.just(HTML)) | st.binary(max_size=300)),
    st.tuples(st.just(".docx"), mutated(st.just(DOCX))),
    st.tuples(
        st.just(".docx"),
        (mutated(st.just(DOCUMENT_XML)) | xml_text).map(docx_with),  # the XML, not the zip
    ),
    st.tuples(st.just(".txt.gz"), mutated(st.just(gzip.compress(b"hello\n" * 20)))),
)
READERS = {".pdf": read_pdf, ".html": read_html, ".docx": read_docx}


def expected_records(suffix: str, data: bytes) -> int | None:
    """How many records `sage source` writes for the file (None: one file's error)."""
    try:
        if suffix == ".txt.gz":
            text = gunzip(data)
            return None if b"\x00" in text[:8192] else 1
        doc: Document = READERS[suffix](data)
    except DocumentError:
        return None
    return len(doc.parts)


@given(documents)
@settings(max_examples=examples(4))
def test_sage_source_on_a_damaged_document_exits_0_or_65_in_one_line(
    case: tuple[str, bytes],
) -> None:
    suffix, data = case
    with tempfile.TemporaryDirectory(prefix="fuzz-documents-") as tmp:
        path = Path(tmp) / f"input{suffix}"
        path.write_bytes(data)
        expected = expected_records(suffix, data)
        failed = run_sage("source", str(path), timeout=60)
        emitted = run_sage("source", "--on-error", "emit", str(path), timeout=60)
    err = failed.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err and "SAGE_DEBUG" not in err, err
    if expected is None:
        assert failed.returncode == 65, err
        assert err.startswith(f"sage source: error: {path}: ") and err.count("\n") == 1, err
        assert failed.stdout == b""
    else:
        assert failed.returncode == 0, err
        records = parse_ndjson(failed.stdout)
        assert len(records) == expected and all(isinstance(r["text"], str) for r in records)
    assert emitted.returncode == 0, emitted.stderr
    out = parse_ndjson(emitted.stdout)
    if expected is None:
        assert len(out) == 1 and out[0]["_error"]["origin"] == str(path), out
    else:
        assert len(out) == expected and not any("_error" in r for r in out), out
