"""Tables for people: rich on a terminal (colour unless NO_COLOR), aligned plain text otherwise.

Used by the commands that report rather than stream (`sage models list`, `sage doctor`).
rich is imported only when a terminal is there to draw on.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TextIO


def print_table(
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    title: str | None = None,
    stream: TextIO | None = None,
    styles: Sequence[str | None] | None = None,
    wrap: Sequence[str] = (),
) -> None:
    """Print `rows` under `columns` to `stream` (stdout by default).

    `styles` gives a rich style per row (e.g. "red" for a failure), ignored in plain text.
    On a terminal only the columns named in `wrap` fold when the table is too wide.
    """
    out = stream or sys.stdout
    if out.isatty():
        from rich.console import Console
        from rich.table import Table

        console = Console(file=out, no_color="NO_COLOR" in os.environ, highlight=False)
        table = Table(title=title, show_lines=False, title_justify="left")
        for col in columns:
            table.add_column(col, overflow="fold", no_wrap=col not in wrap)
        for i, row in enumerate(rows):
            table.add_row(*[str(c) for c in row], style=(styles[i] if styles else None))
        console.print(table)
        return
    cells = [[str(c) for c in columns], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    if title:
        out.write(title + "\n")
    for row in cells:
        line = "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        out.write(line + "\n")
    out.flush()


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
