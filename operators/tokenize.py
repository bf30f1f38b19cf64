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


#: English function words: what `content_terms` leaves out (groundedness in `sage eval`, the
#: query-term features of `sage rerank`). BM25 keeps them: its IDF discounts them already.
STOP_WORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been
    before being below between both but by can could did do does doing down during each few
    for from further had has have having he her here hers herself him himself his how i if in
    into is it its itself just me more most my myself no nor not now of off on once only or
    other our ours ourselves out over own same she should so some such than that the their
    theirs them themselves then there these they this those through to too under until up
    us very was we were what when where which while who whom why will with would you your
    yours yourself yourselves""".split()
)


def content_terms(text: str) -> list[str]:
    """The terms of `text` (as `terms` finds them) that are not `STOP_WORDS`."""
    return [t for t in terms(text) if t not in STOP_WORDS]
