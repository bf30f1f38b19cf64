"""operators.documents: the readers on real files, and their limits."""

import gzip

import pytest

from sage_cli.operators.base import OptionError
from sage_cli.operators.documents import (
    DocumentError,
    gunzip,
    looks_binary,
    parse_converters,
    read_docx,
    read_html,
    read_pdf,
)
from sage_cli.operators.source import Source
from tests.fixtures.documents import make_docx, make_pdf


def test_gunzip_members_limit_and_damage():
    data = gzip.compress(b"one ") + gzip.compress(b"two")
    assert gunzip(data) == b"one two"
    with pytest.raises(DocumentError, match="larger than"):
        gunzip(gzip.compress(b"x" * (3 * 1024 * 1024)), limit=2 * 1024 * 1024)
    with pytest.raises(DocumentError, match="truncated"):
        gunzip(gzip.compress(b"some text here" * 50)[:-20])
    with pytest.raises(DocumentError, match="not a valid gzip"):
        gunzip(b"plain text, not gzip")


def test_looks_binary():
    assert looks_binary(b"\x7fELF\x02\x01\x00")
    assert not looks_binary("naïve café\n".encode())


def test_pdf_page_without_text_is_kept_with_a_warning(tmp_path):
    pdf = make_pdf(tmp_path / "scan.pdf", [["words here"], []])
    doc = read_pdf(pdf.read_bytes())
    assert doc.parts == ["words here", ""]
    assert doc.metadata == {"pages": 2}
    assert doc.warnings and doc.warnings[0].startswith("page 2 has no text layer")
    records = list(Source([str(pdf)]).records())
    assert "_warnings" not in records[0] and records[1]["_warnings"] == doc.warnings


def test_pdf_garbage_is_a_document_error():
    with pytest.raises(DocumentError, match="not a readable PDF"):
        read_pdf(b"%PDF-1.4\nnot really")


def test_html_without_main_content_falls_back_to_all_text():
    doc = read_html(b"<html><body><div>Short note.</div></body></html>")
    assert "Short note." in doc.parts[0]


def test_docx_tables_and_garbage(tmp_path):
    import docx

    document = docx.Document()
    document.add_paragraph("Before the table.")
    table = document.add_table(rows=2, cols=2)
    table.cell(0, 0).text, table.cell(0, 1).text = "name", "value"
    table.cell(1, 0).text, table.cell(1, 1).text = "alpha", "1"
    document.save(str(tmp_path / "t.docx"))
    text = read_docx((tmp_path / "t.docx").read_bytes()).parts[0]
    assert text == "Before the table.\n\nname | value\n\nalpha | 1"
    with pytest.raises(DocumentError, match="DOCX"):
        read_docx(b"PK\x03\x04 not a zip")
    made = make_docx(tmp_path / "h.docx", [("h3", "Deep heading"), ("p", "body")])
    assert read_docx(made.read_bytes()).parts[0] == "### Deep heading\n\nbody"


def test_a_docx_whose_xml_is_broken_is_one_line_of_error(tmp_path):
    """Found by tests/fuzz/harness/fuzz_documents.py: lxml's message for a NUL byte in
    word/document.xml ends in a newline, which went into the error record and on stderr."""
    from tests.fuzz.harness.fuzz_documents import docx_with

    with pytest.raises(DocumentError) as err:
        read_docx(docx_with(b"<not xm\x00\x00l"))
    assert "XMLSyntaxError" in str(err.value) and "\n" not in str(err.value)
    other_namespace = (
        b'<w:document xmlns:w="http://example.org/not-word"><w:body><w:p><w:r><w:t>a</w:t>'
        b"</w:r></w:p></w:body></w:document>"
    )  # also found by the harness: python-docx's AttributeError escaped read_docx
    with pytest.raises(DocumentError, match="not a readable DOCX file .AttributeError"):
        read_docx(docx_with(other_namespace))
    bad = list(Source([str(_write(tmp_path / "x.docx", docx_with(b"<a\x00")))]).records())
    assert len(bad) == 1 and "\n" not in bad[0].message()


def _write(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("spec", ["doc", "=cat", "doc=", "doc='unclosed", "a/b=cat"])
def test_bad_convert_specs_are_usage_errors(spec):
    with pytest.raises(OptionError):
        parse_converters([spec])


def test_convert_spec_is_split_without_a_shell():
    assert parse_converters([".DOC=tr 'a b' c"]) == {".doc": ["tr", "a b", "c"]}
