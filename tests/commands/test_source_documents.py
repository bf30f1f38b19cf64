"""`sage source` on real documents (PDF, HTML, DOCX, gzip, files without an extension, a
converter program) and its accounting of what it skips, in real subprocesses."""

import gzip
import os
import shutil
import subprocess
import time

import orjson

from tests.commands.test_source import _read_record, _watch
from tests.conftest import ROOT, clean_env, parse_ndjson, run_sage, sage_argv
from tests.fixtures.documents import make_docx, make_pdf

# the README tour's web page, also what these tests read
GARDEN = ROOT / "scripts" / "examples" / "web" / "garden.html"


def test_pdf_is_one_record_per_page_with_page_pages_and_title(tmp_path):
    pdf = make_pdf(
        tmp_path / "report.pdf",
        [["Quarterly report", "Revenue grew by 12 percent."], ["Costs fell in the north."]],
        title="Quarterly Report 2026",
    )
    result = run_sage("source", str(pdf))
    assert result.returncode == 0, result.stderr
    records = parse_ndjson(result.stdout)
    assert [r["id"] for r in records] == [f"{pdf}:1", f"{pdf}:2"]
    assert records[0]["text"] == "Quarterly report\nRevenue grew by 12 percent."
    assert records[1]["text"] == "Costs fell in the north."
    for n, r in enumerate(records, 1):
        assert r["metadata"]["page"] == n
        assert r["metadata"]["pages"] == 2
        assert r["metadata"]["title"] == "Quarterly Report 2026"
        assert "%PDF" not in r["text"]


def test_corrupt_pdf_is_one_files_error_and_the_rest_go_through(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    make_pdf(docs / "a.pdf", [["first document"]])
    (docs / "b.pdf").write_bytes(b"%PDF-1.5\n" + os.urandom(300))  # truncated, garbage
    (docs / "c.txt").write_text("third document")
    failed = run_sage("source", str(docs))
    assert failed.returncode == 65
    err = failed.stderr.decode().strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"sage source: error: {docs / 'b.pdf'}: ")
    assert "PDF" in err[0] and "Traceback" not in failed.stderr.decode()
    assert [r["text"] for r in parse_ndjson(failed.stdout)] == ["first document"]
    emitted = run_sage("source", str(docs), "--on-error", "emit")
    assert emitted.returncode == 0, emitted.stderr
    records = parse_ndjson(emitted.stdout)
    assert records[0]["text"] == "first document" and records[2]["text"] == "third document"
    assert records[1]["_error"]["origin"] == str(docs / "b.pdf")
    # skipped, the files are counted, and --verbose names each with why
    skipped = run_sage("source", str(docs), "--on-error", "skip")
    assert skipped.returncode == 0
    assert [r["text"] for r in parse_ndjson(skipped.stdout)] == ["first document", "third document"]
    assert "sage source: could not read 1 file(s); --verbose names them" in skipped.stderr.decode()
    verbose = run_sage("source", str(docs), "--on-error", "skip", "--verbose").stderr.decode()
    assert f"sage source: could not read {docs / 'b.pdf'}: not a readable PDF" in verbose
    assert "could not read 1 file(s)" not in verbose


def test_html_keeps_the_main_text_and_title_without_nav_scripts_styles_footer(tmp_path):
    result = run_sage("source", str(GARDEN))
    assert result.returncode == 0, result.stderr
    (record,) = parse_ndjson(result.stdout)
    text = record["text"]
    assert record["metadata"]["title"] == "Growing Tomatoes at Home"
    assert "six hours of direct sunlight" in text and "Pinch out the side shoots" in text
    for boilerplate in (
        "About us",
        "Shop seeds",
        "tracker",
        "font-family",
        "Copyright",
        "Ten ways",
    ):
        assert boilerplate not in text, boilerplate
    # headings survive as markdown, so chunks carry them
    chunked = subprocess.run(
        sage_argv("chunk", "--size", "40"),
        input=result.stdout,
        capture_output=True,
        env=clean_env(),
    )
    headings = {c["metadata"].get("heading") for c in parse_ndjson(chunked.stdout)}
    assert "Growing Tomatoes at Home > Watering" in headings


def test_docx_headings_become_chunk_headings(tmp_path):
    doc = make_docx(
        tmp_path / "guide.docx",
        [
            ("title", "Field Guide"),
            ("p", "An introduction to the guide."),
            ("h1", "Installing"),
            ("p", "Run the installer and wait."),
            ("h2", "On Linux"),
            ("p", "Use the package manager."),
        ],
        title="The Field Guide",
    )
    result = run_sage("source", str(doc))
    assert result.returncode == 0, result.stderr
    (record,) = parse_ndjson(result.stdout)
    assert record["metadata"]["title"] == "The Field Guide"
    chunked = subprocess.run(
        sage_argv("chunk", "--size", "200"),
        input=result.stdout,
        capture_output=True,
        env=clean_env(),
    )
    chunks = parse_ndjson(chunked.stdout)
    by_heading = {c["metadata"]["heading"]: c["text"] for c in chunks}
    assert "Use the package manager." in by_heading["Installing > On Linux"]
    assert "Run the installer" in by_heading["Installing"]


def test_gz_no_extension_binary_and_skips_are_accounted_for(tmp_path):
    tree = tmp_path / "doc"
    (tree / "pkg").mkdir(parents=True)
    (tree / "pkg" / "copyright").write_text("Copyright holders: everyone")
    (tree / "pkg" / "changelog.gz").write_bytes(gzip.compress(b"version 2: fixed the bug"))
    (tree / "pkg" / "notes.md.gz").write_bytes(gzip.compress(b"# Notes\n\nsome notes"))
    (tree / "pkg" / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (tree / "pkg" / "data.tar.gz").write_bytes(gzip.compress(b"x"))
    (tree / "pkg" / "run").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00binary")
    (tree / "pkg" / "notes.txt").write_bytes(b"text\x00with a NUL")
    (tree / ".hidden").write_text("hidden")
    outside = tmp_path / "secret.txt"
    outside.write_text("PRIVATE")
    os.symlink(outside, tree / "pkg" / "leak.txt")
    os.symlink("pkg/copyright", tree / "inside")  # stays in the tree: followed (read once)
    os.symlink("..", tree / "pkg" / "loop")  # a loop inside the tree: walked once

    result = run_sage("source", str(tree), "--on-error", "emit")
    assert result.returncode == 0, result.stderr
    records = parse_ndjson(result.stdout)
    texts = [r.get("text") for r in records]
    assert "Copyright holders: everyone" in texts
    assert "version 2: fixed the bug" in texts
    assert "# Notes\n\nsome notes" in texts
    assert "PRIVATE" not in result.stdout.decode()
    # a .txt file is text by its name: binary content in it is that file's error; a file
    # without an extension found in the tree is text only if it looks like text: skipped
    errors = [r["_error"] for r in records if "_error" in r]
    assert [e["origin"] for e in errors] == [str(tree / "pkg" / "notes.txt")]
    assert "binary" in errors[0]["error"]
    err = result.stderr.decode().strip().splitlines()
    assert err[-1] == (
        "sage source: skipped 5 file(s): unknown extension 2 (.png 1, .tar.gz 1), "
        "binary content 1, symlink leading out of the tree 1, hidden 1; --verbose lists them; "
        "read them with --format text or --convert EXT=COMMAND"
    )
    verbose = run_sage("source", str(tree), "--on-error", "skip", "--verbose")
    listed = verbose.stderr.decode()
    assert f"skipped {tree / 'pkg' / 'leak.txt'} (symlink leading out of the tree)" in listed
    assert f"skipped {tree / 'pkg' / 'logo.png'} (unknown extension)" in listed
    assert f"skipped {tree / 'pkg' / 'run'} (binary content)" in listed
    named = run_sage("source", str(tree / "pkg" / "run"))  # named: refused, exit 65
    assert named.returncode == 65 and b"binary content" in named.stderr
    # --format text reads every file of the tree; the binary ones are skipped and counted
    forced = run_sage("source", str(tree), "--format", "text", "--on-error", "skip")
    assert b"binary content 3" in forced.stderr  # run, logo.png, notes.txt
    quiet = run_sage("source", str(tree), "--on-error", "skip", "-q")
    assert quiet.stderr == b""


def test_format_text_applies_to_directories(tmp_path):
    (tmp_path / "a.py").write_text("print('hello')")
    (tmp_path / "b.txt").write_text("plain")
    auto = run_sage("source", str(tmp_path))
    assert [r["text"] for r in parse_ndjson(auto.stdout)] == ["plain"]
    forced = run_sage("source", str(tmp_path), "--format", "text")
    assert forced.returncode == 0 and forced.stderr == b""
    assert [r["text"] for r in parse_ndjson(forced.stdout)] == ["print('hello')", "plain"]


def test_convert_runs_a_program_without_a_shell(tmp_path):
    (tmp_path / "a.rot").write_text("uryyb jbeyq")
    (tmp_path / "b.txt").write_text("plain")
    marker = tmp_path / "pwned"
    result = run_sage("source", str(tmp_path), "--convert", "rot=tr a-z n-za-m")
    assert result.returncode == 0, result.stderr
    assert [r["text"] for r in parse_ndjson(result.stdout)] == ["hello world", "plain"]
    (tmp_path / "c.rot.gz").write_bytes(gzip.compress(b"pbzcerffrq"))  # converted once inflated
    inflated = run_sage("source", str(tmp_path / "c.rot.gz"), "--convert", "rot=tr a-z n-za-m")
    assert parse_ndjson(inflated.stdout)[0]["text"] == "compressed"
    (tmp_path / "c.rot.gz").unlink()
    # the command is split like a shell would split it, but never run by one
    injected = run_sage("source", str(tmp_path / "a.rot"), "--convert", f"rot=cat ; touch {marker}")
    assert injected.returncode == 65 and not marker.exists()
    assert injected.stderr.decode().startswith(f"sage source: error: {tmp_path / 'a.rot'}: ")
    missing = run_sage("source", str(tmp_path), "--convert", "rot=no-such-converter-xyz")
    assert missing.returncode == 2
    assert b"no-such-converter-xyz" in missing.stderr and len(missing.stderr.splitlines()) == 1
    assert shutil.which("false")
    failing = run_sage("source", str(tmp_path), "--convert", "rot=false", "--on-error", "skip")
    assert failing.returncode == 0
    assert [r["text"] for r in parse_ndjson(failing.stdout)] == ["plain"]


def test_watch_emits_a_deletion_record_when_an_emitted_file_is_removed(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.txt").write_text("alpha")
    proc = _watch(tmp_path, "inbox")
    try:
        deadline = time.monotonic() + 20
        assert _read_record(proc, deadline)["id"] == "inbox/a.txt"
        (inbox / "a.txt").unlink()
        assert _read_record(proc, deadline) == {
            "id": "inbox/a.txt",
            "deleted": True,
            "metadata": {"path": "inbox/a.txt"},
        }
        proc.terminate()
        proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert orjson.dumps(proc.returncode) == b"143"
