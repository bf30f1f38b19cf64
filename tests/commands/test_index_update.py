"""`sage index build DIR --update`: changed documents replaced, new ones added, missing ones
removed, and only what changed embedded (the real MiniLM model)."""

import numpy as np
import orjson
import pytest

from tests.conftest import ndjson, parse_ndjson, run_sage

pytestmark = pytest.mark.model


def _chunks(docs) -> bytes:
    source = run_sage("source", str(docs))
    assert source.returncode == 0, source.stderr
    chunked = run_sage(
        "chunk", "--by", "sentences", "--size", "1", "--overlap", "0", input=source.stdout
    )
    assert chunked.returncode == 0, chunked.stderr
    return chunked.stdout


def _build(index, data: bytes, *flags: str) -> dict:
    result = run_sage("index", "build", str(index), *flags, input=data)
    assert result.returncode == 0, result.stderr
    return orjson.loads(result.stdout)


def _stored(index) -> dict[str, tuple[str, np.ndarray]]:
    records = parse_ndjson((index / "records.ndjson").read_bytes())
    vectors = np.load(index / "vectors.npy")
    return {r["id"]: (r["text"], vectors[i]) for i, r in enumerate(records)}


def _ask(index, query: str) -> str:
    result = run_sage(
        "retrieve", "--index", str(index), "-k", "1", input=ndjson([{"query": query}])
    )
    assert result.returncode == 0, result.stderr
    return orjson.loads(result.stdout)["docs"][0]["text"]


def test_update_embeds_only_what_changed(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("Cats sleep most of the day. " * 6)
    (docs / "b.txt").write_text("The train to Lyon leaves at nine.")
    (docs / "c.txt").write_text("Volcanoes erupt molten rock called lava.")
    index = tmp_path / "idx"
    cold = _build(index, _chunks(docs))
    before = _stored(index)
    assert cold["count"] == len(before) > 3

    (docs / "b.txt").write_text("The train to Lyon now leaves at ten, from platform four.")
    (docs / "c.txt").unlink()
    (docs / "d.txt").write_text("Penguins live in the southern hemisphere.")
    summary = _build(index, _chunks(docs), "--update")
    after = _stored(index)
    a_ids = sorted(i for i in before if i.startswith(str(docs / "a.txt")))
    assert summary["reused"] == len(a_ids)  # a.txt unchanged: not embedded again
    assert summary["embedded"] == len(after) - len(a_ids)  # b changed, d new
    assert summary["removed"] == 1  # c.txt
    assert not any("c.txt" in i for i in after)
    for i in a_ids:
        assert after[i][0] == before[i][0]
        assert np.array_equal(after[i][1], before[i][1])
    assert "platform four" in _ask(index, "when does the Lyon train leave")
    assert "Penguins" in _ask(index, "where do penguins live")

    # the same listing again: nothing to embed
    again = _build(index, _chunks(docs), "--update")
    assert (again["embedded"], again["reused"], again["removed"]) == (0, len(after), 0)


def test_update_keep_missing_applies_changes_and_deletion_records(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name, text in {
        "a.txt": "Apples grow on trees.",
        "b.txt": "Bananas are yellow.",
        "c.txt": "Cherries are red.",
    }.items():
        (docs / name).write_text(text)
    index = tmp_path / "idx"
    _build(index, _chunks(docs))
    (docs / "b.txt").write_text("Bananas turn brown when they are ripe.")
    changes = _chunks(docs / "b.txt") + ndjson(
        [{"id": str(docs / "c.txt"), "deleted": True, "metadata": {"path": str(docs / "c.txt")}}]
    )
    # deletion records pass through chunk and embed on their way to the index
    embedded = run_sage("embed", input=changes)
    assert embedded.returncode == 0, embedded.stderr
    assert parse_ndjson(embedded.stdout)[-1]["deleted"] is True
    summary = _build(index, embedded.stdout, "--update", "--keep-missing")
    stored = _stored(index)
    texts = sorted(t for t, _ in stored.values())
    assert texts == ["Apples grow on trees.", "Bananas turn brown when they are ripe."]
    # b came with its vector (from embed), a's was carried over, c's dropped
    assert (summary["embedded"], summary["reused"], summary["removed"]) == (0, 1, 1)
    # nothing but a deletion: the rest stays
    gone = ndjson([{"id": str(docs / "a.txt"), "deleted": True}])
    _build(index, gone, "--keep-missing")
    assert [t for t, _ in _stored(index).values()] == ["Bananas turn brown when they are ripe."]


def test_update_with_empty_input_leaves_the_index_alone(tmp_path):
    index = tmp_path / "idx"
    _build(index, ndjson([{"id": "x", "text": "some text"}]))
    result = run_sage("index", "build", str(index), "--update", input=b"")
    assert result.returncode == 2
    assert b"--update" in result.stderr and len(result.stderr.splitlines()) == 1
    assert [t for t, _ in _stored(index).values()] == ["some text"]
