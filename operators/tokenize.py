"""Model-free text tokenization shared by chunking and BM25.

`count_tokens` approximates what a subword model sees without loading one: every run of word
characters is one token and every other non-space character (punctuation, symbols) is one
token. For English prose this is within ~15% of MiniLM's WordPiece count, which is good enough
for sizing chunks; nothing here ever loads a model.

`terms` is the BM25 analyzer: lower-cased runs of word characters (Unicode-aware), no stemming,
no stop words (IDF already discounts common words).
"""

from __future__ import annotations

import re

#: one token: a run of word characters, or a single other non-space character
TOKEN_RE = re.compile(r"\w+|[^\w\s]")
#: one BM25 term: a run of word characters
TERM_RE = re.compile(r"\w+")


def count_tokens(text: str) -> int:
    """Number of model-free tokens in `text` (see the module docstring)."""
    return len(TOKEN_RE.findall(text))


def terms(text: str) -> list[str]:
    """The BM25 terms of `text`: lower-cased runs of word characters."""
    return TERM_RE.findall(text.lower())
