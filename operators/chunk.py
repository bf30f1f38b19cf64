"""Split documents into overlapping chunks (`sage chunk`).

A document's `text` (or `content`) is cut into units, then units are packed greedily into chunks
of at most `size` (measured in the unit of `by`), each chunk starting so that it repeats at
most `overlap` of the previous one:

- `chars`: units are whitespace-separated words; a chunk spans at most `size` characters of the
  original text (inner whitespace included). A word longer than `size` becomes a chunk of its own:
  a chunk never ends inside a word.
- `tokens`: the same words, weighed by `operators.tokenize.count_tokens` (model-free: a run of
  word characters or one punctuation character is one token).
- `sentences`: units are sentences (a `.`, `!` or `?` run followed by white space and a character
  that is not lower case, or a blank line); `size`/`overlap` count sentences.
- `paragraphs`: units are blocks separated by blank lines; `size`/`overlap` count paragraphs.

Markdown ATX headings (`# Title` ... `###### Title`, outside fenced code) start a new section:
chunks never cross a section boundary, keep the heading line in their text, and carry the heading
path of their section as `metadata.heading` ("Guide > Install"). In the counting modes a heading
line counts as nothing, so it always travels with the text below it.

Chunk ids are `<doc id>#<n>` (n from 0) with `parent_id`; a document without `id` is named by
the first 12 hex digits of the SHA-256 of its text. `metadata` gains `chunk` (n) and `start`/`end`
(character offsets in the parent text). Every other field is copied to each chunk; `content` is
replaced by `text`. Empty or blank documents yield no chunks. Output is deterministic.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, ClassVar

from .base import Operator, OptionError, Record, RecordError, record_text
from .tokenize import count_tokens

UNITS = ("chars", "tokens", "sentences", "paragraphs")
#: (size, overlap) when the user gives none, per unit
DEFAULTS: dict[str, tuple[int, int]] = {
    "chars": (800, 100),
    "tokens": (200, 25),
    "sentences": (5, 1),
    "paragraphs": (2, 0),
}

_HEADING_RE = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_FENCE_RE = re.compile(r"^ {0,3}(```|~~~)")
_WORD_RE = re.compile(r"\S+")
_BLANK_RE = re.compile(r"\n[ \t]*\n")
_SENTENCE_END_RE = re.compile(r"[.!?]+[\"')\]]*(?=\s)")


@dataclass
class Section:
    start: int
    end: int
    path: list[str]
    heading_end: int  # end of the heading line (== start when the section has no heading)


def markdown_sections(text: str) -> list[Section]:
    """Cut `text` at ATX headings outside fenced code; each section knows its heading path."""
    sections: list[Section] = []
    stack: list[tuple[int, str]] = []
    fence: str | None = None
    current = Section(0, len(text), [], 0)
    pos = 0
    for line in text.splitlines(keepends=True):
        stripped = line.rstrip("\r\n")
        fenced = _FENCE_RE.match(stripped)
        if fenced:
            marker = fenced.group(1)
            fence = None if fence == marker else (fence or marker)
        elif fence is None:
            heading = _HEADING_RE.match(stripped)
            if heading:
                level = len(heading.group(1))
                title = heading.group(2).strip()
                current.end = pos
                sections.append(current)
                stack = [(lv, t) for lv, t in stack if lv < level] + [(level, title)]
                current = Section(pos, len(text), [t for _, t in stack if t], pos + len(stripped))
        pos += len(line)
    sections.append(current)
    # a heading with nothing under it before the next heading lives on in the next one's path
    return [s for s in sections if text[s.heading_end : s.end].strip()]


def _word_units(text: str, start: int, end: int) -> list[tuple[int, int]]:
    return [(m.start() + start, m.end() + start) for m in _WORD_RE.finditer(text[start:end])]


def _span_units(text: str, start: int, end: int, cuts: list[int]) -> list[tuple[int, int]]:
    """Spans between cut points, stripped of surrounding white space, empty ones dropped."""
    units = []
    bounds = [start, *cuts, end]
    for a, b in pairwise(bounds):
        piece = text[a:b]
        lead = len(piece) - len(piece.lstrip())
        trail = len(piece.rstrip())
        if trail > lead:
            units.append((a + lead, a + trail))
    return units


def _sentence_cuts(text: str, start: int, end: int) -> list[int]:
    cuts = []
    body = text[start:end]
    for m in _SENTENCE_END_RE.finditer(body):
        rest = body[m.end() :].lstrip()
        if rest and rest[0].islower():
            continue  # "e.g. this" is not a sentence end
        cuts.append(start + m.end())
    cuts.extend(start + m.start() for m in _BLANK_RE.finditer(body))
    return sorted(set(cuts))


def sentences(text: str) -> list[str]:
    """The sentences of `text` as `sage chunk --by sentences` counts them (`.`/`!`/`?` + space
    + a character that is not lower case, or a blank line), stripped, blank ones left out."""
    return [
        text[a:b] for a, b in _span_units(text, 0, len(text), _sentence_cuts(text, 0, len(text)))
    ]


def _paragraph_cuts(text: str, start: int, end: int) -> list[int]:
    return [start + m.start() for m in _BLANK_RE.finditer(text[start:end])]


def pack(
    n: int, measure: Callable[[int, int], int], size: int, overlap: int
) -> list[tuple[int, int]]:
    """Greedy packing of units 0..n-1 into [i, j) ranges with measure(i, j) <= size (at least one
    unit each); each range starts as early as possible with measure(start, previous j) <= overlap.
    """
    ranges: list[tuple[int, int]] = []
    i = 0
    while i < n:
        j = i + 1
        while j < n and measure(i, j + 1) <= size:
            j += 1
        ranges.append((i, j))
        if j >= n:
            break
        start = j
        while start - 1 > i and measure(start - 1, j) <= overlap:
            start -= 1
        i = start
    return ranges


class Chunker(Operator):
    """Split `text` into overlapping chunks with ids `<doc id>#<n>` and `parent_id`."""

    name = "chunk"
    requires: ClassVar[dict[str, dict[str, Any]]] = {
        "text": {"type": "string", "description": "the document (`content` is accepted too)"},
    }
    produces: ClassVar[dict[str, dict[str, Any]]] = {
        "id": {"type": "string", "description": "<doc id>#<n>"},
        "parent_id": {"type": "string"},
        "text": {"type": "string"},
        "metadata": {"type": "object", "description": "chunk, start, end, heading"},
    }

    def __init__(
        self, by: str = "chars", size: int | None = None, overlap: int | None = None
    ) -> None:
        if by not in UNITS:
            raise OptionError(f"--by {by!r}: choose one of {', '.join(UNITS)}")
        default_size, default_overlap = DEFAULTS[by]
        self.by = by
        self.size = default_size if size is None else size
        if overlap is None:
            overlap = min(default_overlap, self.size - 1)
        self.overlap = overlap
        if self.size < 1:
            raise OptionError(f"--size must be at least 1, got {self.size}")
        if not 0 <= self.overlap < self.size:
            raise OptionError(
                f"--overlap must be between 0 and --size - 1 ({self.size - 1}), got {self.overlap}"
            )

    def process(self, batch: list[Record]) -> list[Record]:
        out: list[Record] = []
        for record in batch:
            out.extend(self.chunk_record(record))
        return out

    def chunk_record(self, record: Record) -> list[Record]:
        if record.get("deleted") is True and "text" not in record:
            return [record]  # a deletion record (source --watch) passes through for the index
        text = record_text(record)
        metadata = record.get("metadata")
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict):
            raise RecordError(f"field 'metadata' must be an object, got {type(metadata).__name__}")
        doc_id = record.get("id")
        if doc_id is None:
            doc_id = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        doc_id = str(doc_id)
        base = {k: v for k, v in record.items() if k != "content"}
        out = []
        for n, (start, end, path) in enumerate(self.spans(text)):
            meta = dict(metadata)
            meta.update(chunk=n, start=start, end=end)
            if path:
                meta["heading"] = " > ".join(path)
            chunk = dict(base)
            chunk.update(id=f"{doc_id}#{n}", parent_id=doc_id, text=text[start:end], metadata=meta)
            out.append(chunk)
        return out

    def spans(self, text: str) -> list[tuple[int, int, list[str]]]:
        """(start, end, heading path) of every chunk of `text`."""
        result = []
        for section in markdown_sections(text):
            units, weights = self._units(text, section)
            if not units:
                continue
            if self.by == "chars":  # characters spanned, inner white space included
                starts = [a for a, _ in units]
                ends = [b for _, b in units]

                def measure(i: int, j: int, a: list[int] = starts, b: list[int] = ends) -> int:
                    return b[j - 1] - a[i] if j > i else 0
            else:  # the sum of the unit weights, from prefix sums
                prefix = [0]
                for w in weights:
                    prefix.append(prefix[-1] + w)

                def measure(i: int, j: int, a: list[int] = prefix, b: list[int] = prefix) -> int:
                    return b[j] - a[i]

            for i, j in pack(len(units), measure, self.size, self.overlap):
                result.append((units[i][0], units[j - 1][1], section.path))
        return result

    def _units(self, text: str, section: Section) -> tuple[list[tuple[int, int]], list[int]]:
        start, end = section.start, section.end
        if self.by in ("chars", "tokens"):
            units = _word_units(text, start, end)
            weights = [count_tokens(text[a:b]) for a, b in units] if self.by == "tokens" else []
            return units, weights
        units = []
        weights = []
        if section.heading_end > start:  # the heading line: a unit that weighs nothing
            units.append((start, section.heading_end))
            weights.append(0)
            start = section.heading_end
        cuts = (_sentence_cuts if self.by == "sentences" else _paragraph_cuts)(text, start, end)
        body = _span_units(text, start, end, cuts)
        units.extend(body)
        weights.extend([1] * len(body))
        return units, weights
