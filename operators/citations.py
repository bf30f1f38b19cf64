"""Which retrieved documents an answer cites, and how much of it the documents support.

The `qa` template numbers the documents `[1]`, `[2]`, ... and asks the model to cite the ones
it used by number. `cited_ids` reads those markers back (`[2]`, `[1, 3]`, `[1][3]`,
`[Document 2]`) and maps each number to the id of that document in the record's `docs`: these
are the `citations` `sage generate` records. A number with no document behind it (the model
invented `[7]` for five documents) is not a citation. Nothing is inferred for an answer
without markers: `citations` is then empty.

`groundedness` (a `sage eval` score) is the share of the answer's content words (terms that are
not stop words, citation numbers left out) that occur in the text of the retrieved documents:
1.0 when every content word of the answer is found there, None when the answer has no content
word to check.
"""

from __future__ import annotations

import re
from typing import Any

from .base import RecordError
from .prompt import doc_text
from .tokenize import content_terms

#: `[2]`, `[1, 3]`, `[1 and 2]`, `[Document 2]`, `[doc 2, 3]`
_MARKER_RE = re.compile(r"\[((?:doc(?:ument)?s?\s*)?\d+(?:\s*(?:,|and|&|;)\s*\d+)*)\]", re.I)
_NUMBER_RE = re.compile(r"\d+")


def cited_numbers(answer: str) -> list[int]:
    """The document numbers cited in `answer`, in order of first citation, each once."""
    numbers: dict[int, None] = {}
    for marker in _MARKER_RE.finditer(answer):
        for number in _NUMBER_RE.findall(marker.group(1)):
            numbers.setdefault(int(number), None)
    return list(numbers)


def _doc_id(doc: Any) -> Any:
    return doc.get("id") if isinstance(doc, dict) else None


def cited_ids(answer: str, docs: list[Any]) -> list[Any]:
    """The ids of the documents of `docs` (numbered from 1, as the qa template shows them)
    that `answer` cites; numbers outside 1..len(docs) and docs without an id are skipped."""
    out: list[Any] = []
    for n in cited_numbers(answer):
        if 1 <= n <= len(docs):
            doc_id = _doc_id(docs[n - 1])
            if doc_id is not None and doc_id not in out:
                out.append(doc_id)
    return out


def add_citations(record: dict[str, Any]) -> None:
    """Set `citations` on a generated record that has `answer` and a list of `docs` (the
    per-record hook `sage generate` calls); records without docs are left as they are."""
    docs = record.get("docs")
    if isinstance(docs, list) and isinstance(record.get("answer"), str):
        record["citations"] = cited_ids(record["answer"], docs)


def strip_markers(answer: str) -> str:
    """`answer` without its citation markers."""
    return _MARKER_RE.sub(" ", answer)


def groundedness(answer: str, docs: list[Any]) -> float | None:
    """Share of the answer's content words found in the documents' text (None: no content
    word in the answer, or no document with text)."""
    words = content_terms(strip_markers(answer))
    texts = []
    for i, doc in enumerate(docs):
        try:
            texts.append(doc_text(doc, i))
        except RecordError:  # a hit given by id alone (docs scored for recall only)
            continue
    if not words or not texts:
        return None
    found = {term for text in texts for term in content_terms(text)}
    return sum(w in found for w in words) / len(words)
