"""Document readers (issue 14): what each library costs to import and how fast it reads,
measured in this run. No targets: these are the figures docs/dataflow.md cites for choosing
pypdfium2 (PDF), trafilatura (HTML) and python-docx (DOCX).

- documents.import_s.LIB: seconds to import the library in a fresh interpreter (the fastest of
  --repeat runs), the cost a `sage source` pays once, and only when it reads such a file.
- documents.pdf_pages_per_s: pages per second of operators.documents.read_pdf over a 200-page
  PDF written by PDFium (12 lines of text a page); html_pages_per_s: read_html over the 2 KB
  test page (scripts/examples/web/garden.html); docx_files_per_s: read_docx over a 60-paragraph
  DOCX written by python-docx. In one process, after a warm-up call.
- documents.html_startup_ratio: wall time of `sage source garden.html` over `sage source
  garden.txt` (the same text): what reading one web page adds to a stage's start-up.
"""

from __future__ import annotations

import subprocess
import sys
import time

from tests.bench import OUT, ROOT, Report, sage_command, shell_env

REPRODUCE = "python -m tests.bench --only documents"
PAGE = ROOT / "scripts" / "examples" / "web" / "garden.html"


def _import_s(module: str, repeat: int) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    runs = [
        float(subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout)
        for _ in range(repeat)
    ]
    return min(runs)


def _rate(fn, data: bytes, seconds: float = 2.0) -> float:
    fn(data)  # warm-up (imports)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn(data)
        n += 1
    return n / (time.perf_counter() - t0)


def _wall(args: list[str], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run([*sage_command(), *args], capture_output=True, env=shell_env(), check=True)
        best = min(best, time.perf_counter() - t0)
    return best


def measure(repeat: int = 3) -> dict[str, float]:
    from sage_cli.operators.documents import read_docx, read_html, read_pdf
    from tests.fixtures.documents import make_docx, make_pdf

    work = OUT / "work" / "documents"
    work.mkdir(parents=True, exist_ok=True)
    lines = [f"Line {j} of the page says something about rivers and harbors." for j in range(12)]
    pdf = make_pdf(work / "big.pdf", [lines] * 200, title="Bench")
    blocks = [("h1" if i % 10 == 0 else "p", f"Paragraph {i} about lanterns.") for i in range(60)]
    docx = make_docx(work / "doc.docx", blocks)
    figures = {
        f"import_s.{name}": _import_s(module, repeat)
        for name, module in (
            ("pypdfium2", "pypdfium2"),
            ("trafilatura", "trafilatura"),
            ("python-docx", "docx"),
        )  # fmt: skip
    }
    t0 = time.perf_counter()
    pages = len(read_pdf(pdf.read_bytes()).parts)
    figures["pdf_pages_per_s"] = pages / (time.perf_counter() - t0)
    figures["html_pages_per_s"] = _rate(read_html, PAGE.read_bytes())
    figures["docx_files_per_s"] = _rate(read_docx, docx.read_bytes())
    text = work / "garden.txt"
    text.write_text(read_html(PAGE.read_bytes()).parts[0])
    _wall(["source", str(PAGE)], 1)
    figures["html_startup_ratio"] = _wall(["source", str(PAGE)], repeat) / _wall(
        ["source", str(text)], repeat
    )
    return figures


def run(report: Report) -> dict[str, float]:
    figures = measure(report.repeat)
    units = {"pdf_pages_per_s": "pages/s", "html_pages_per_s": "pages/s"}
    for name, value in figures.items():
        unit = "s" if name.startswith("import_s") else units.get(name, "")
        unit = "files/s" if name == "docx_files_per_s" else unit
        report(f"documents.{name}", value, unit, command=REPRODUCE)
    return figures


if __name__ == "__main__":
    print(measure())
