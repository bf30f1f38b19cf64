import re
from itertools import pairwise

import pytest

from sage_cli.operators.base import OptionError, RecordError
from sage_cli.operators.chunk import Chunker, markdown_sections, pack
from sage_cli.operators.tokenize import count_tokens

PROSE = ("The quick brown fox jumps over the lazy dog. " * 30).strip()
DOC = """# Guide
Intro text here. Second sentence! It is e.g. fine. Third?

## Install
Run pip install. Then run it.

```
# not a heading
```

# Other
Last words.
"""


def words_of(text):
    return set(re.findall(r"\S+", text))


@pytest.mark.parametrize(
    "by,size,overlap",
    [
        ("chars", 60, 15),
        ("chars", 200, 0),
        ("tokens", 12, 3),
        ("sentences", 2, 1),
        ("paragraphs", 1, 0),
    ],
)
def test_chunks_cover_document_and_never_split_words(by, size, overlap):
    chunks = Chunker(by, size, overlap).run([{"id": "d", "text": PROSE + "\n\n" + DOC}])
    text = PROSE + "\n\n" + DOC
    covered = [False] * len(text)
    for c in chunks:
        m = c["metadata"]
        assert c["text"] == text[m["start"] : m["end"]]
        # boundaries fall on whitespace (or the ends of the text): no word is cut
        assert m["start"] == 0 or text[m["start"] - 1].isspace()
        assert m["end"] == len(text) or text[m["end"]].isspace()
        for i in range(m["start"], m["end"]):
            covered[i] = True
    assert all(covered[i] for i, ch in enumerate(text) if not ch.isspace())


def test_chars_size_and_overlap_respected():
    chunks = Chunker("chars", 60, 15).run([{"id": "d", "text": PROSE}])
    assert len(chunks) > 5
    for a, b in pairwise(chunks):
        assert len(a["text"]) <= 60
        overlap = a["metadata"]["end"] - b["metadata"]["start"]
        assert 0 < overlap <= 15  # each chunk repeats the tail of the previous one
    assert [c["id"] for c in chunks[:3]] == ["d#0", "d#1", "d#2"]
    assert {c["parent_id"] for c in chunks} == {"d"}


def test_tokens_counted_without_a_model():
    assert count_tokens("Hello, world! don't") == 7  # Hello , world ! don ' t
    chunks = Chunker("tokens", 10, 0).run([{"id": "d", "text": PROSE}])
    assert len(chunks) >= count_tokens(PROSE) / 10  # no chunk over 10 tokens: enough of them
    assert all(count_tokens(c["text"]) <= 10 for c in chunks)
    assert "".join(c["text"] for c in chunks).replace(" ", "") == PROSE.replace(" ", "")


def test_long_word_is_its_own_chunk():
    chunks = Chunker("chars", 5, 0).run([{"id": "x", "text": "abcdefghij kl mn"}])
    assert [c["text"] for c in chunks] == ["abcdefghij", "kl mn"]


def test_markdown_headings_become_metadata_and_code_fences_are_ignored():
    sections = markdown_sections(DOC)
    assert [s.path for s in sections] == [["Guide"], ["Guide", "Install"], ["Other"]]
    chunks = Chunker("paragraphs", 1, 0).run([{"id": "d", "text": DOC}])
    headings = [c["metadata"].get("heading") for c in chunks]
    assert headings[0] == "Guide"
    assert "Guide > Install" in headings and headings[-1] == "Other"
    # the heading line travels with the first paragraph under it
    assert chunks[0]["text"].startswith("# Guide\nIntro text here.")
    assert any(
        "# not a heading" in c["text"] and c["metadata"]["heading"] == "Guide > Install"
        for c in chunks
    )


def test_sentences_split_on_sentence_ends_only():
    chunks = Chunker("sentences", 1, 0).run(
        [{"id": "d", "text": "One here. Two e.g. this. Three!"}]
    )
    assert [c["text"] for c in chunks] == ["One here.", "Two e.g. this.", "Three!"]


def test_fields_pass_through_content_alias_and_metadata_merged():
    rec = {"id": 7, "content": "alpha beta", "metadata": {"src": "a.md"}, "lang": "en"}
    [chunk] = Chunker().run([rec])
    assert chunk == {
        "id": "7#0",
        "parent_id": "7",
        "text": "alpha beta",
        "lang": "en",
        "metadata": {"src": "a.md", "chunk": 0, "start": 0, "end": 10},
    }
    assert rec["metadata"] == {"src": "a.md"}  # the input is not mutated


def test_missing_id_gets_content_hash_and_is_deterministic():
    a = Chunker("chars", 30, 5).run([{"text": PROSE}])
    b = Chunker("chars", 30, 5).run([{"text": PROSE}])
    assert a == b
    assert re.fullmatch(r"[0-9a-f]{12}#0", a[0]["id"])


def test_blank_document_gives_no_chunks_and_missing_text_is_record_error():
    assert Chunker().run([{"id": "e", "text": "  \n "}]) == []
    with pytest.raises(RecordError, match="'text'"):
        Chunker().run([{"id": "e", "body": "x"}])
    with pytest.raises(RecordError, match="metadata"):
        Chunker().run([{"id": "e", "text": "x", "metadata": "no"}])


@pytest.mark.parametrize("kwargs", [{"by": "words"}, {"size": 0}, {"size": 10, "overlap": 10}])
def test_bad_options(kwargs):
    with pytest.raises(OptionError):
        Chunker(**kwargs)


def test_pack_progresses_with_large_overlap():
    ranges = pack(5, lambda i, j: j - i, 2, 1)
    assert ranges == [(0, 2), (1, 3), (2, 4), (3, 5)]
