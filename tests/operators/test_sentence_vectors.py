"""Sentence vectors in an index (operators.sentence_vectors): written by the builder when it
has the model, reused by --update, read by the default `sage retrieve` to re-score its dense
candidates, and checked like every other index file."""

import numpy as np
import orjson
import pytest

from sage_cli.operators.base import ResourceUnavailable
from sage_cli.operators.index import Index, IndexBuilder, ModelRef, read_manifest, write_index
from sage_cli.operators.retrieve import Retriever
from sage_cli.operators.sentence_vectors import SentenceVectors, leading_sentences
from tests.operators.test_index import FakeEmbedder

DIM = 8
TEXTS = {
    "a": "Red apples grow on trees. They are sweet. Pick them in autumn. Store them cool.",
    "b": "Blue sky at noon.",
    "c": "Green grass needs rain. Cut it weekly.",
}


def _builder(tmp_path, fake, **kwargs):
    (tmp_path / "models").mkdir(exist_ok=True)
    (tmp_path / "models" / "all-MiniLM-L6-v2.f16.gguf").write_bytes(b"GGUF")  # never loaded
    return IndexBuilder(
        tmp_path / "ix",
        model="minilm-l6",
        model_dirs=[str(tmp_path / "models")],
        embedder_factory=lambda p, t: fake,
        **kwargs,
    )


def _records(texts=TEXTS):
    return [{"id": k, "text": v} for k, v in texts.items()]


def test_builder_embeds_the_first_three_sentences_of_each_chunk(tmp_path):
    fake = FakeEmbedder()
    [summary] = _builder(tmp_path, fake).run(_records())
    # the chunks, then the sentences: a's first 3, none for b (one sentence: its own vector)
    assert fake.calls[1] == [
        "Red apples grow on trees.",
        "They are sweet.",
        "Pick them in autumn.",
        "Green grass needs rain.",
        "Cut it weekly.",
    ]
    assert summary["sentence_vectors"] == 5
    manifest = read_manifest(tmp_path / "ix")
    assert manifest["files"]["sentences"] == "sentences.npz"
    assert manifest["build"]["sentences"] == {"leading": 3}
    sentences = Index(tmp_path / "ix").sentences
    assert sentences is not None
    assert sentences.offsets.tolist() == [0, 3, 3, 5]
    want = FakeEmbedder().embed(fake.calls[1])
    assert np.allclose(sentences.of_row(0), want[:3]) and np.allclose(sentences.of_row(2), want[3:])


def test_no_sentences_without_the_flag_or_without_the_model(tmp_path):
    fake = FakeEmbedder()
    [summary] = _builder(tmp_path, fake, sentences=False).run(_records())
    assert summary["sentence_vectors"] == 0 and len(fake.calls) == 1
    assert "sentences" not in read_manifest(tmp_path / "ix")["files"]
    assert Index(tmp_path / "ix").sentences is None
    # vectors given by the records, from a model this machine does not have: the index is
    # built as before, without sentence vectors
    vecs = FakeEmbedder().embed(list(TEXTS.values()))
    given = [
        {"id": k, "text": t, "embedding": v.tolist(), "embedding_model": "elsewhere"}
        for (k, t), v in zip(TEXTS.items(), vecs, strict=True)
    ]
    [summary] = IndexBuilder(tmp_path / "other", model_dirs=[]).run(given)
    assert summary["sentence_vectors"] == 0 and summary["count"] == 3
    # the installed model has another sha256 than the records' vectors: none either
    other = FakeEmbedder(sha="0" * 64)
    for r in given:
        r["embedding_model"] = "minilm-l6@" + "f" * 64
    builder = _builder(tmp_path, other)
    builder.directory = tmp_path / "third"
    [summary] = builder.run(given)
    assert summary["sentence_vectors"] == 0 and other.calls == []


def test_update_embeds_only_the_sentences_of_changed_chunks(tmp_path):
    _builder(tmp_path, FakeEmbedder()).run(_records())
    before = Index(tmp_path / "ix").sentences
    assert before is not None
    changed = dict(TEXTS, c="Yellow sand is dry. Rake it daily.")
    fake = FakeEmbedder()
    [summary] = _builder(tmp_path, fake, update=True).run(_records(changed))
    assert summary["embedded"] == 1 and summary["reused"] == 2
    assert fake.calls == [[changed["c"]], ["Yellow sand is dry.", "Rake it daily."]]
    after = Index(tmp_path / "ix").sentences
    assert after is not None and after.offsets.tolist() == [0, 3, 3, 5]
    assert np.array_equal(after.of_row(0), before.of_row(0))  # taken, not embedded again
    assert np.allclose(after.of_row(2), FakeEmbedder().embed(fake.calls[1]))
    # --keep-missing carries the documents it does not name with their sentence vectors
    fake = FakeEmbedder()
    _builder(tmp_path, fake, keep_missing=True).run([{"id": "d", "text": "New. Two."}])
    kept = Index(tmp_path / "ix")
    assert kept.sentences is not None and [r["id"] for r in kept.records] == ["d", "a", "b", "c"]
    assert np.array_equal(kept.sentences.of_row(1), before.of_row(0))


def test_update_over_damaged_sentence_vectors_embeds_them_again(tmp_path):
    _builder(tmp_path, FakeEmbedder()).run(_records())
    (tmp_path / "ix" / "sentences.npz").write_bytes(b"PK\x03\x04 damaged")
    with pytest.raises(ResourceUnavailable, match="corrupt sentence vectors"):
        _ = Index(tmp_path / "ix").sentences
    fake = FakeEmbedder()
    [summary] = _builder(tmp_path, fake, update=True).run(_records())
    assert summary["reused"] == 3 and summary["embedded"] == 0  # chunk vectors were fine
    assert summary["sentence_vectors"] == 5 and len(fake.calls) == 1  # sentences: once more
    healed = Index(tmp_path / "ix").sentences
    assert healed is not None and healed.offsets.tolist() == [0, 3, 3, 5]


def _unit(v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


def test_rescore_adds_the_best_sentence_cosine():
    query = _unit([1, 0, 0, 0])
    chunks = np.stack([_unit([0.6, 0.8, 0, 0]), _unit([0.5, 0, 0.866, 0]), _unit([0, 0, 0, 1])])
    per_row = [_unit([0.3, 0.95, 0, 0])[None], _unit([0.99, 0.14, 0, 0])[None], np.zeros((0, 4))]
    vectors = SentenceVectors.__new__(SentenceVectors)
    vectors.vectors = np.vstack([p for p in per_row if len(p)]).astype(np.float32)
    vectors.offsets = np.array([0, 1, 2, 2])
    hits = vectors.rescore(chunks, query, [0, 1, 2, 1], 0.5, 3)
    assert [r for r, _ in hits] == [1, 0, 2]  # row 1's sentence answers; rows once each
    assert hits[0][1] == pytest.approx(0.5 + 0.5 * 0.99, abs=1e-3)
    assert hits[2][1] == pytest.approx(0.0)  # no sentences: its own cosine stands in
    assert vectors.rescore(chunks, query, [], 0.5, 3) == []


def test_default_retrieve_ranks_by_sentences_and_weight_0_or_dense_mode_do_not(tmp_path):
    query = _unit([1, 0, 0, 0])
    chunks = np.stack([_unit([0.6, 0.8, 0, 0]), _unit([0.5, 0, 0.866, 0])])
    records = [{"id": "plain", "text": "alpha beta"}, {"id": "answer", "text": "gamma delta"}]
    sentences = [_unit([0.3, 0.95, 0, 0])[None], _unit([0.99, 0.14, 0, 0])[None]]
    write_index(tmp_path / "ix", chunks, records, ModelRef("m"), trees=2, sentences=sentences)
    asked = [{"query": "zzz", "embedding": query.tolist()}]  # no word in common: dense alone

    def top(**kwargs):
        [out] = Retriever(tmp_path / "ix", k=2, exact=True, **kwargs).run(asked)
        return [d["id"] for d in out["docs"]]

    assert top() == ["answer", "plain"]
    assert top(sentence_weight=0.0) == ["plain", "answer"]
    assert top(mode="dense") == ["plain", "answer"]
    write_index(tmp_path / "old", chunks, records, ModelRef("m"), trees=2)  # none: as before
    [out] = Retriever(tmp_path / "old", k=2, exact=True).run(asked)
    assert [d["id"] for d in out["docs"]] == ["plain", "answer"]


def test_damaged_or_unsafe_sentence_files_are_refused(tmp_path):
    chunks = np.stack([_unit([1, 0]), _unit([0, 1])])
    records = [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}]
    write_index(
        tmp_path / "ix", chunks, records, ModelRef("m"), trees=2, sentences=[chunks[:1], chunks]
    )
    asked = [{"query": "x", "embedding": [1.0, 0.0]}]
    (tmp_path / "ix" / "sentences.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(ResourceUnavailable, match="corrupt sentence vectors"):
        Retriever(tmp_path / "ix", exact=True).run(asked)
    # offsets that do not fit the index: refused, not read past
    with open(tmp_path / "ix" / "sentences.npz", "wb") as fh:
        np.savez(fh, vectors=chunks.astype(np.float32), offsets=np.array([0, 5, 2]))
    with pytest.raises(ResourceUnavailable, match="do not fit the index"):
        Retriever(tmp_path / "ix", exact=True).run(asked)
    manifest = orjson.loads((tmp_path / "ix" / "manifest.json").read_bytes())
    manifest["files"]["sentences"] = "../elsewhere.npz"
    (tmp_path / "ix" / "manifest.json").write_bytes(orjson.dumps(manifest))
    with pytest.raises(ResourceUnavailable, match="unsafe sentences file"):
        Index(tmp_path / "ix")


def test_leading_sentences_are_the_chunkers_sentences():
    text = "One thing. Another thing! A third? A fourth."
    assert leading_sentences(text) == ["One thing.", "Another thing!", "A third?"]


def test_builder_tells_how_far_the_sentence_vectors_got(tmp_path, monkeypatch):
    """The embedding after the last record is told as it goes (the progress display), in
    slices, and gives the vectors one call gives."""
    import sage_cli.operators.index as index_mod

    monkeypatch.setattr(index_mod, "CLOSING_SLICE", 2)
    told: list[tuple[str, int, int]] = []
    fake = FakeEmbedder()
    builder = _builder(tmp_path, fake)
    builder.on_closing = lambda what, done, total: told.append((what, done, total))
    builder.run(_records())
    assert told == [("sentence vectors", n, 5) for n in (0, 2, 4, 5)]
    assert fake.calls[1:] == [
        ["Red apples grow on trees.", "They are sweet."],
        ["Pick them in autumn.", "Green grass needs rain."],
        ["Cut it weekly."],
    ]
    quiet = FakeEmbedder()
    (tmp_path / "quiet").mkdir()
    _builder(tmp_path / "quiet", quiet).run(_records())
    a = Index(tmp_path / "ix").sentences
    b = Index(tmp_path / "quiet" / "ix").sentences
    assert a is not None and b is not None
    assert np.array_equal(a.vectors, b.vectors) and np.array_equal(a.offsets, b.offsets)


def test_rerank_with_the_index_takes_its_sentence_vectors(tmp_path):
    """`sage rerank --index DIR` (sentence): the docs the index holds with the same text are
    scored with its sentences.npz, so only the query (and what the index lacks) is embedded,
    and the order and scores are those of embedding everything."""
    from sage_cli.operators.rerank import Reranker

    _builder(tmp_path, FakeEmbedder()).run(_records())
    docs = [
        {"id": "c", "text": TEXTS["c"], "score": 0.5},
        {"id": "a", "text": TEXTS["a"], "score": 0.6},
        {"id": "b", "text": TEXTS["b"], "score": 0.4},  # one sentence: none kept for it
        {"id": "a2", "text": "Not in the index. Two sentences.", "score": 0.3},
        {"id": "a", "text": "Changed since the build. Its vectors are stale.", "score": 0.2},
    ]
    asked = [{"query": "when to pick apples", "docs": docs}]
    fake = FakeEmbedder()
    op = Reranker(
        "sentence",
        index=tmp_path / "ix",
        model_dirs=[str(tmp_path / "models")],
        embedder_factory=lambda p, t: fake,
    )
    [out] = op.run(asked)
    assert fake.calls == [
        [
            "when to pick apples",
            "Blue sky at noon.",
            "Not in the index.",
            "Two sentences.",
            "Changed since the build.",
            "Its vectors are stale.",
        ]
    ]
    everything = FakeEmbedder()
    [want] = Reranker("sentence", model=__file__, embedder_factory=lambda p, t: everything).run(
        asked
    )
    assert len(everything.calls[0]) == 1 + 10
    assert [(d["id"], d["text"], d["score"]) for d in out["docs"]] == [
        (d["id"], d["text"], d["score"]) for d in want["docs"]
    ]


def test_sentence_vectors_are_mapped_not_read_and_other_npz_forms_still_load(tmp_path):
    """np.load of an .npz reads its members whole (about 3x vectors.npy, in every process that
    opens the index): the stored `vectors` member is memory-mapped instead; a compressed file
    (written by other tools) is read as before; one cut short is refused."""
    chunks = np.stack([_unit([1, 0]), _unit([0, 1])]).astype(np.float32)
    records = [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}]
    write_index(
        tmp_path / "ix", chunks, records, ModelRef("m"), trees=2, sentences=[chunks[:1], chunks]
    )
    mapped = Index(tmp_path / "ix").sentences
    assert mapped is not None and isinstance(mapped.vectors, np.memmap)
    assert np.array_equal(mapped.of_row(1), chunks) and mapped.offsets.tolist() == [0, 1, 3]
    path = tmp_path / "ix" / "sentences.npz"
    with open(path, "wb") as fh:
        np.savez_compressed(
            fh, vectors=np.vstack([chunks[:1], chunks]), offsets=np.array([0, 1, 3])
        )
    read = Index(tmp_path / "ix").sentences
    assert read is not None and not isinstance(read.vectors, np.memmap)
    assert np.array_equal(read.of_row(1), chunks)
    with open(path, "wb") as fh:
        np.savez(fh, offsets=np.array([0, 1, 3]), vectors=np.vstack([chunks[:1], chunks]))
    path.write_bytes(path.read_bytes()[:-40])  # the vectors' last bytes (and the directory) gone
    with pytest.raises(ResourceUnavailable, match="corrupt sentence vectors"):
        _ = Index(tmp_path / "ix").sentences
